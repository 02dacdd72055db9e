# Copyright (c) kd_detr contributors.
"""DINO with one class / box head per decoder layer (``MODEL.DETR.DINO.SHARE_HEADS False``,
detrex's layout): every layer's outputs recomputed by hand from its own heads, the refinement
that feeds the next layer uses the layer's own box head, gradients reach every head (layer 0's
box head also through layer 1's boxes with look-forward-twice), and per-layer copies of a shared
model's heads reproduce the shared model exactly."""
import os
import tempfile
import unittest

import numpy as np
import torch
from torch import nn

from detectron2.modeling import build_model

from .model_helpers import (
    perturb_box_heads,
    perturb_deformable_attention,
    single_thread_module,
)
from .test_dab_detr import synthetic_batch
from .test_dino import tiny_cfg

PER_LAYER = ("MODEL.DETR.DINO.SHARE_HEADS", "False")
EPS = 1e-3  # configs/tests/dino_tiny.yaml: MODEL.DETR.DEFORMABLE.INVERSE_SIGMOID_EPS


setUpModule, tearDownModule = single_thread_module()


def logit(x):
    """inverse_sigmoid as DINO clamps it, written out."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=EPS) / (1 - x).clamp(min=EPS))


def per_layer_dino(*opts, seed=0):
    """Tiny per-layer-head DINO whose heads all differ (their last layers are re-drawn), and
    whose attention weights are perturbed so that every gradient is non-zero."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(*PER_LAYER, *opts))
    perturb_box_heads(list(model.bbox_embed) + [model.enc_bbox_embed])
    with torch.no_grad():
        for head in model.class_embed:
            head.weight.normal_(std=0.1)
            head.bias.normal_(std=0.5)
    perturb_deformable_attention(model)
    return model


class TestPerLayerHeads(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = per_layer_dino().eval()
        cls.batch = synthetic_batch()
        cls.images = cls.model.preprocess_image(cls.batch)

    def test_structure(self):
        model = self.model
        self.assertIsInstance(model.class_embed, nn.ModuleList)
        self.assertEqual((len(model.class_embed), len(model.bbox_embed)), (2, 2))
        self.assertIsNot(model.bbox_embed[0], model.bbox_embed[1])
        self.assertIsInstance(model.enc_class_embed, nn.Linear)  # the encoder keeps its own
        shared = build_model(tiny_cfg())
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        head = count(shared.class_embed) + count(shared.bbox_embed)
        self.assertEqual(count(model) - count(shared), head)  # one extra pair for 2 layers

    def test_layers_use_their_own_heads(self):
        model = self.model
        captured = []  # each decoder layer's un-normalised output (what the refinement reads)
        hooks = [
            layer.register_forward_hook(lambda mod, args, out: captured.append(out))
            for layer in model.transformer.decoder.layers
        ]
        try:
            with torch.no_grad():
                out = model.forward_raw(self.images)
        finally:
            for hook in hooks:
                hook.remove()
        layers = out["layers"]
        hs, refs = layers["hidden_states"], layers["reference_boxes"]
        with torch.no_grad():
            # layer 0 refines the selected proposals with ITS box head; layer 1 starts there
            refined = (model.bbox_embed[0](captured[0]) + logit(refs[0])).sigmoid()
            torch.testing.assert_close(refs[1], refined)
            for i in range(2):
                logits = model.class_embed[i](hs[i])
                boxes = (model.bbox_embed[i](hs[i]) + logit(refs[i])).sigmoid()
                torch.testing.assert_close(layers["pred_logits"][i], logits, msg=f"layer {i}")
                torch.testing.assert_close(layers["pred_boxes"][i], boxes, msg=f"layer {i}")
            # the other layer's heads would give different outputs: the test can tell them apart
            other = model.class_embed[0](hs[1])
            self.assertGreater((other - layers["pred_logits"][1]).abs().max().item(), 1e-2)
            other = (model.bbox_embed[0](hs[1]) + logit(refs[1])).sigmoid()
            self.assertGreater((other - layers["pred_boxes"][1]).abs().max().item(), 1e-3)
        torch.testing.assert_close(out["pred_logits"], layers["pred_logits"][-1])

    def test_gradients_reach_every_head(self):
        model = per_layer_dino().train()
        losses = model(self.batch)
        sum(losses.values()).backward()
        heads = {
            "class_embed.0": model.class_embed[0],
            "class_embed.1": model.class_embed[1],
            "bbox_embed.0": model.bbox_embed[0],
            "bbox_embed.1": model.bbox_embed[1],
            "enc_class_embed": model.enc_class_embed,
            "enc_bbox_embed": model.enc_bbox_embed,
        }
        for name, head in heads.items():
            for pname, p in head.named_parameters():
                self.assertIsNotNone(p.grad, f"{name}.{pname}")
                self.assertGreater(p.grad.abs().sum().item(), 0, f"{name}.{pname}")

    def test_look_forward_twice_trains_the_previous_layers_box_head(self):
        for twice in (True, False):
            model = per_layer_dino("MODEL.DETR.DINO.LOOK_FORWARD_TWICE", str(twice)).train()
            out = model.forward_raw(self.images)
            last_boxes = out["layers"]["pred_boxes"][-1]
            params = list(model.bbox_embed[0].parameters())
            grads = torch.autograd.grad(last_boxes.sum(), params, allow_unused=True)
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            self.assertEqual(reached, twice, f"look_forward_twice={twice}")
            # layer 1's class head never trains layer 0's box head (detached reference)
            logits = out["layers"]["pred_logits"][-1]
            grads = torch.autograd.grad(logits.sum(), params, allow_unused=True)
            self.assertTrue(all(g is None or g.abs().sum() == 0 for g in grads))

    def test_copies_of_shared_heads_reproduce_the_shared_model(self):
        torch.manual_seed(1)
        shared = build_model(tiny_cfg()).eval()
        with torch.no_grad():
            shared.bbox_embed.layers[-1].weight.normal_(std=0.1)
            shared.class_embed.bias.normal_(std=0.5)
        state = {}
        for key, value in shared.state_dict().items():
            name, _, rest = key.partition(".")
            if name in ("class_embed", "bbox_embed"):
                state.update({f"{name}.{i}.{rest}": value for i in range(2)})
            else:
                state[key] = value
        per_layer = build_model(tiny_cfg(*PER_LAYER)).eval()
        per_layer.load_state_dict(state, strict=True)
        with torch.no_grad():
            a, b = shared.forward_raw(self.images), per_layer.forward_raw(self.images)
        for key in ("pred_logits", "pred_boxes", "reference_boxes"):
            torch.testing.assert_close(b["layers"][key], a["layers"][key], msg=key)

    def test_open_vocabulary_head_needs_shared_heads(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "text.npy")
            np.save(path, np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
            ov = (
                "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.DETR.CLASS_HEAD",
                "region_text", "MODEL.OV.EMBED_DIM", "16", "MODEL.OV.TEXT_EMBEDDINGS", path,
                "MODEL.OV.BACKGROUND", "none",
            )  # fmt: skip
            self.assertNotIsInstance(build_model(tiny_cfg(*ov)).class_embed, nn.Linear)
            with self.assertRaisesRegex(ValueError, "set MODEL.DETR.DINO.SHARE_HEADS True"):
                build_model(tiny_cfg(*ov, *PER_LAYER))


if __name__ == "__main__":
    unittest.main()
