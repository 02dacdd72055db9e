# Copyright (c) kd_detr contributors.
"""kd_detr DeformableDETR vs Hugging Face ``DeformableDetrForObjectDetection`` (random weights,
float32, eval): plain, box refinement and two-stage.

The Hugging Face model is saved with ``save_pretrained``, converted by
``tools/convert_checkpoint.py --source hf`` and loaded into the model of
``configs/tests/deformable_detr_tiny_parity.yaml``; every decoder layer's logits and boxes (and,
two-stage, the encoder proposals' logits and boxes) must match. Hugging Face's per-layer outputs
are its decoder's hidden states and reference points with the heads applied as
``DeformableDetrForObjectDetection.forward`` does.
"""
import os
import unittest

import torch

from kd_detr.checkpoint import (
    convert_hf_deformable_detr,
    hf_deformable_detr_config_mismatches,
)
from kd_detr.modeling.meta_arch import DeformableDETR  # noqa: F401  (registers the model)

from .common import REPO_ROOT
from .hf_reference import HFParityTestCase, hf_backbone_kwargs, parity_cfg, perturb_hf_weights
from .test_dab_detr_parity import padded_batch

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")
TOLERANCE = 1e-4
REFINE = ["MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True"]
TWO_STAGE = REFINE + ["MODEL.DETR.DEFORMABLE.TWO_STAGE", "True"]


def build_hf_deformable_detr(transformers, seed: int = 0, hf_resnet: bool = False, **overrides):
    """The Hugging Face twin of the parity config; random weights perturbed so that no bias,
    head or normalisation parameter keeps its constant initial value."""
    kwargs = dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=10,
        two_stage_num_proposals=10,
        num_labels=5,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        dropout=0.0,
    )
    kwargs.update(overrides)
    kwargs.update(hf_backbone_kwargs(transformers, hf_resnet, ["stage2", "stage3", "stage4"]))
    torch.manual_seed(seed)
    config = transformers.DeformableDetrConfig(**kwargs)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    return perturb_hf_weights(model, seed)


def hf_layer_outputs(hf, images, mask):
    """Hugging Face logits (L, B, Q, C) and boxes (L, B, Q, 4) of every decoder layer, and its
    raw output."""
    from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

    out = hf(pixel_values=images, pixel_mask=(~mask).long())
    hidden = out.intermediate_hidden_states.transpose(0, 1)  # (L, B, Q, d)
    refs = [out.init_reference_points] + list(out.intermediate_reference_points.unbind(1))[:-1]
    logits, boxes = [], []
    for level, (h, ref) in enumerate(zip(hidden, refs)):
        delta = hf.bbox_embed[level](h)
        if ref.shape[-1] == 2:
            delta = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1)
        else:
            delta = delta + inverse_sigmoid(ref)
        logits.append(hf.class_embed[level](h))
        boxes.append(delta.sigmoid())
    return torch.stack(logits), torch.stack(boxes), out


class TestDeformableDETRParity(HFParityTestCase):
    CONFIG = CONFIG

    def check(self, hf, opts=(), num_layers=2):
        model = self.convert_and_load(self.save_hf(hf), opts)[0]
        images, mask = padded_batch()
        with torch.no_grad():
            ours = model.forward_raw((images, mask))
            logits, boxes, theirs = hf_layer_outputs(hf, images, mask)
        layers = ours["layers"]
        self.assertEqual(tuple(layers["pred_logits"].shape), (num_layers, 2, 10, 5))
        pairs = [
            ("logits", layers["pred_logits"], logits),
            ("boxes", layers["pred_boxes"], boxes),
            ("final logits", ours["pred_logits"], theirs.logits),
            ("final boxes", ours["pred_boxes"], theirs.pred_boxes),
        ]
        if theirs.enc_outputs_class is not None:
            enc = ours["enc_outputs"]
            pairs += [
                ("encoder logits", enc["pred_logits"], theirs.enc_outputs_class),
                ("encoder boxes", enc["pred_boxes"], theirs.enc_outputs_coord_logits.sigmoid()),
                ("initial references", layers["reference_boxes"][0], theirs.init_reference_points),
            ]
        diffs = {name: (a - b).abs().max().item() for name, a, b in pairs}
        print(f"max abs diff vs Hugging Face {list(opts)}: {diffs}")
        for name, diff in diffs.items():
            self.assertLessEqual(diff, TOLERANCE, name)
        # Not degenerate: layers differ and the queries do not all predict the same box.
        self.assertGreater((layers["pred_boxes"][0] - layers["pred_boxes"][1]).abs().max(), 0.01)
        self.assertGreater(layers["pred_boxes"][-1].std(dim=1).min().item(), 0.01)
        return model

    def test_parity_plain_timm_resnet18(self):
        self.check(build_hf_deformable_detr(self.transformers))

    def test_parity_box_refine_hf_resnet18(self):
        hf = build_hf_deformable_detr(
            self.transformers, seed=1, hf_resnet=True, with_box_refine=True, decoder_layers=3
        )
        self.check(hf, REFINE + ["MODEL.DETR.DEC_LAYERS", "3"], num_layers=3)

    def test_parity_two_stage(self):
        hf = build_hf_deformable_detr(
            self.transformers, seed=2, with_box_refine=True, two_stage=True
        )
        self.check(hf, TWO_STAGE)

    def test_config_mismatch_and_bad_keys(self):
        hf = build_hf_deformable_detr(self.transformers, with_box_refine=True)
        config = hf.config.to_dict()
        cfg = parity_cfg(CONFIG, REFINE)
        self.assertEqual(hf_deformable_detr_config_mismatches(config, cfg), [])
        cfg = parity_cfg(CONFIG, ["MODEL.DETR.DEFORMABLE.DEC_N_POINTS", "4"])
        problems = hf_deformable_detr_config_mismatches(config, cfg)
        self.assertIn("decoder_n_points=2 but MODEL.DETR.DEFORMABLE.DEC_N_POINTS=4", problems)
        self.assertIn(
            "with_box_refine=True but MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE=False", problems
        )
        state = dict(hf.state_dict())
        state["model.extra_head.weight"] = torch.zeros(1)
        with self.assertRaisesRegex(ValueError, "model.extra_head.weight"):
            convert_hf_deformable_detr(state, config)
        # Without box refinement the heads are shared: distinct per-layer heads are refused.
        config_plain = dict(config, with_box_refine=False)
        state.pop("model.extra_head.weight")
        with self.assertRaisesRegex(ValueError, "bbox_embed.1 differs from bbox_embed.0"):
            convert_hf_deformable_detr(state, config_plain)


if __name__ == "__main__":
    unittest.main()
