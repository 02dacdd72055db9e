# Copyright (c) kd_detr contributors.
"""MGD (masked generative distillation): the loss against an explicit float64 computation
(adapter, mask, conv3x3-ReLU-conv3x3 by loops), the mask ratio, reproducibility under a seeded
generator, gradients to the student and the term's modules only, a state_dict round trip, a
start-up error naming a missing feature, one KD step on the demo pair (blocks optimised and
checkpointed)."""
import math
import os
import tempfile
import unittest

import numpy as np
import torch

from kd_detr.distill import MGDLoss

from .kd_feature_helpers import (
    StandInModel,
    demo_pair_trainer,
    feature_context,
    logged_losses,
    term_parameter_checks,
)
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


def conv3x3(x, weight, bias):
    """Zero-padded 3 x 3 convolution of one map (C, H, W) by loops, float64."""
    c, h, w = x.shape
    padded = np.zeros((c, h + 2, w + 2))
    padded[:, 1:-1, 1:-1] = x
    out = np.zeros((weight.shape[0], h, w))
    for o in range(weight.shape[0]):
        for i in range(h):
            for j in range(w):
                out[o, i, j] = bias[o] + (weight[o] * padded[:, i : i + 3, j : j + 3]).sum()
    return out


def mgd_reference(term, s_map, t_map, seed, alpha, ratio):
    """alpha * sum (G(adapter(F_s) * mask) - F_t)^2 / B with the mask of the documented draw."""
    p = {k: v.detach().double().numpy() for k, v in term.state_dict().items()}
    s, t = s_map.detach().double().numpy(), t_map.detach().double().numpy()
    b, _, h, w = t.shape
    u = torch.rand((b, 1, h, w), generator=torch.Generator().manual_seed(seed)).double().numpy()
    total = 0.0
    for n in range(b):
        aligned = np.einsum("oc,chw->ohw", p["adapters.res5.weight"][:, :, 0, 0], s[n])
        aligned += p["adapters.res5.bias"][:, None, None]
        keep = np.array([[1.0 if u[n, 0, i, j] <= 1 - ratio else 0.0 for j in range(w)]
                         for i in range(h)])  # fmt: skip
        hidden = conv3x3(aligned * keep, p["generators.res5.0.weight"], p["generators.res5.0.bias"])
        out = conv3x3(np.maximum(hidden, 0), p["generators.res5.2.weight"],
                      p["generators.res5.2.bias"])  # fmt: skip
        total += ((out - t[n]) ** 2).sum()
    return alpha * total / b


def bound_term(**kwargs):
    term = MGDLoss(features=["res5"], **kwargs)
    term.bind(StandInModel({"res5": (3, 16)}), StandInModel({"res5": (4, 16)}))
    return term


class TestMGDFormula(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(0)
        self.s_map = torch.randn(2, 3, 3, 4, generator=gen, requires_grad=True)
        self.t_map = torch.randn(2, 4, 3, 4, generator=gen, requires_grad=True)
        torch.manual_seed(0)
        self.term = bound_term(alpha=0.5, mask_ratio=0.4)

    def losses(self, term, seed):
        term.generator = torch.Generator().manual_seed(seed)
        return term(feature_context({"res5": self.s_map}, {"res5": self.t_map}))

    def test_against_float64(self):
        self.assertEqual(MGDLoss.inputs, {"backbone_features"})
        for seed in (0, 1, 2):
            out = self.losses(self.term, seed)["loss_kd_mgd_res5"].item()
            expected = mgd_reference(self.term, self.s_map, self.t_map, seed, 0.5, 0.4)
            self.assertAlmostEqual(out / expected, 1.0, places=5)

    def test_seeded_generator_reproduces_the_mask(self):
        first = self.losses(self.term, 7)["loss_kd_mgd_res5"].item()
        self.assertEqual(first, self.losses(self.term, 7)["loss_kd_mgd_res5"].item())
        self.assertNotEqual(first, self.losses(self.term, 8)["loss_kd_mgd_res5"].item())

    def test_mask_ratio(self):
        term = MGDLoss(mask_ratio=0.65)
        term.generator = torch.Generator().manual_seed(0)
        mask = term.random_mask(4, 50, 50, torch.device("cpu"))
        self.assertEqual(tuple(mask.shape), (4, 1, 50, 50))
        self.assertEqual(set(mask.unique().tolist()), {0.0, 1.0})
        self.assertAlmostEqual(1 - mask.mean().item(), 0.65, delta=0.02)  # 10000 cells
        self.assertEqual(MGDLoss(mask_ratio=0.0).random_mask(1, 5, 5, "cpu").min().item(), 1.0)

    def test_gradients_reach_student_and_term_only(self):
        sum(self.losses(self.term, 0).values()).backward()
        self.assertGreater(self.s_map.grad.abs().sum().item(), 0)
        self.assertIsNone(self.t_map.grad)  # the teacher's map is detached
        for name, p in self.term.named_parameters():
            self.assertIsNotNone(p.grad, name)
            self.assertGreater(p.grad.abs().sum().item(), 0, name)

    def test_state_dict_round_trip(self):
        other = bound_term(alpha=0.5, mask_ratio=0.4)  # other random weights until loaded
        self.assertNotEqual(self.losses(self.term, 3)["loss_kd_mgd_res5"].item(),
                            self.losses(other, 3)["loss_kd_mgd_res5"].item())  # fmt: skip
        other.load_state_dict(self.term.state_dict())
        self.assertEqual(self.losses(self.term, 3)["loss_kd_mgd_res5"].item(),
                         self.losses(other, 3)["loss_kd_mgd_res5"].item())  # fmt: skip


class TestMGDStartUp(unittest.TestCase):
    def test_missing_backbone_feature_is_named(self):
        with self.assertRaisesRegex(ValueError, "MGDLoss.*'stage4'.*student.*\\['res5'\\]"):
            MGDLoss(features=["stage4"]).bind(
                StandInModel({"res5": (3, 16)}), StandInModel({"stage4": (5, 16)})
            )

    def test_bad_settings(self):
        with self.assertRaisesRegex(ValueError, "MASK_RATIO"):
            MGDLoss(mask_ratio=1.0)
        with self.assertRaisesRegex(ValueError, "FEATURES is empty"):
            MGDLoss(features=[])


class TestMGDInTraining(unittest.TestCase):
    def test_kd_step_on_demo_pair(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = demo_pair_trainer(
                tmp, "MODEL.KD.LOSSES", "['KDDETRLoss', 'MGDLoss']",
                "MODEL.KD.MGD.FEATURES", "['stage4']",
            )  # fmt: skip
            term = trainer.kd_losses[1]
            self.assertIn("backbone_features", trainer._trainer.kd_inputs)
            term_parameter_checks(self, trainer, term)
            before = term.generators["stage4"][0].weight.detach().clone()
            trainer.resume_or_load(resume=False)
            trainer.train()
            value = logged_losses(trainer)["loss_kd_mgd_stage4"]
            self.assertTrue(math.isfinite(value) and value > 0)
            self.assertFalse(torch.equal(term.generators["stage4"][0].weight, before))  # learned
            saved = torch.load(os.path.join(tmp, "run", "model_final.pth"), weights_only=False)
            for key in ("1.generators.stage4.0.weight", "1.adapters.stage4.weight"):
                self.assertIn(key, saved["kd_losses"])
            torch.testing.assert_close(saved["kd_losses"]["1.generators.stage4.2.weight"],
                                       term.generators["stage4"][2].weight)  # fmt: skip
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))


if __name__ == "__main__":
    unittest.main()
