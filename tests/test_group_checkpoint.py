# Copyright (c) kd_detr contributors.
"""MODEL.DETR.GROUP_CHECKPOINT: the extra query groups' decoder activations are recomputed in the
backward pass instead of kept; outputs and gradients are those of the plain forward."""
import copy
import os
import unittest

import torch

from detectron2.modeling import build_model

from .common import REPO_ROOT
from .kd_helpers import TINY_OPTS, config_from, perturb_box_heads, synthetic_batch
from .model_helpers import perturb_deformable_attention, single_thread_module

setUpModule, tearDownModule = single_thread_module()

TESTS = os.path.join(REPO_ROOT, "configs", "tests")
CASES = {
    "DABDETR": ("dab_detr_tiny_parity.yaml", []),
    "DN-DABDETR": ("dab_detr_tiny_parity.yaml", ["MODEL.DETR.DN.ENABLED", "True"]),
    "DeformableDETR": ("deformable_detr_tiny_parity.yaml", []),
    "DINO": ("dino_tiny.yaml", []),
    "RTDETR": ("rt_detr_tiny_parity.yaml", []),
}


def groups(num_points=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"boxes": torch.rand(1, num_points, 4, generator=gen) * 0.5 + 0.25} for _ in range(2)]


def saved_bytes(fn):
    """(fn's result, bytes of the tensors autograd saved for the backward pass during fn)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


class TestGroupCheckpoint(unittest.TestCase):
    def run_model(self, model, batch, extra=True):
        torch.manual_seed(3)  # the same denoising noise in both runs
        points = groups() if extra else []
        (losses, outputs), saved = saved_bytes(lambda: model(batch, extra_query_groups=points))
        point_loss = sum(g["pred_logits"].sigmoid().sum() + g["pred_boxes"].sum()
                         for g in outputs["groups"])  # fmt: skip
        total = sum(losses.values()) + point_loss
        model.zero_grad()
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return losses, outputs, grads, saved

    def test_same_outputs_and_gradients_less_saved_memory(self):
        for name, (config, opts) in CASES.items():
            with self.subTest(model=name):
                cfg = config_from(os.path.join(TESTS, config), *TINY_OPTS, *opts,
                                  "MODEL.DETR.GROUP_DECODING", "separate")  # fmt: skip
                torch.manual_seed(0)
                plain = build_model(cfg).train()
                perturb_box_heads([plain.bbox_embed] if hasattr(plain.bbox_embed, "layers")
                                  else list(plain.bbox_embed))  # fmt: skip
                perturb_deformable_attention(plain)
                checkpointed = copy.deepcopy(plain)
                checkpointed.group_checkpoint = True
                batch = synthetic_batch(2)
                a_losses, a_out, a_grads, a_saved = self.run_model(plain, batch)
                b_losses, b_out, b_grads, b_saved = self.run_model(checkpointed, batch)
                for key, value in a_losses.items():
                    torch.testing.assert_close(b_losses[key], value, rtol=1e-5, atol=1e-6)
                for ga, gb in zip(a_out["groups"], b_out["groups"]):
                    torch.testing.assert_close(gb["pred_boxes"], ga["pred_boxes"])
                self.assertEqual(set(a_grads), set(b_grads))
                for key, grad in a_grads.items():
                    torch.testing.assert_close(b_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)
                # What the groups add to the saved activations: all of it without checkpointing,
                # little with it (the checkpoint keeps its inputs; the query embeddings of the
                # groups are computed outside it).
                base_saved = self.run_model(plain, batch, extra=False)[3]
                self.assertGreater(a_saved - base_saved, 0)
                self.assertLess(b_saved - base_saved, 0.25 * (a_saved - base_saved), name)

    def test_off_in_eval_and_without_groups(self):
        cfg = config_from(os.path.join(TESTS, "dab_detr_tiny_parity.yaml"), *TINY_OPTS,
                          "MODEL.DETR.GROUP_CHECKPOINT", "True")  # fmt: skip
        model = build_model(cfg)
        self.assertTrue(model.group_checkpoint)
        calls = []
        original = model._decode_all

        def spy(encoded, sets, denoising=None):
            calls.append(len(sets))
            return original(encoded, sets, denoising)

        model._decode_all = spy
        model(synthetic_batch(2), extra_query_groups=[])
        model.eval()
        with torch.no_grad():
            model(synthetic_batch(2), extra_query_groups=groups())
        self.assertEqual(calls, [1, 3])  # one pass each: nothing to checkpoint / eval mode
