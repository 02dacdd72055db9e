# Copyright (c) kd_detr contributors.
"""FGD (focal and global distillation): the box masks on hand-worked cases, the four losses
against an explicit float64 computation, gradients to the student and the term's modules only,
a state_dict round trip, start-up errors naming what is missing, one KD step on the demo pair."""
import math
import tempfile
import unittest

import numpy as np
import torch

from kd_detr.distill import FGDLoss, fgd_box_masks

from .kd_feature_helpers import (
    NoBackboneModel,
    StandInModel,
    demo_pair_trainer,
    feature_context,
    logged_losses,
    term_parameter_checks,
)
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


def cxcywh(x0, y0, x1, y1, w, h):
    """A pixel xyxy box as cxcywh normalised by the image's (w, h)."""
    return [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]


# Image 0: 64 x 64 px, two boxes; image 1: 48 x 64 px (h x w, padded to 64 x 64), one box.
# Map 4 x 4 cells of 16 px.
TARGETS = [
    {"boxes": torch.tensor([cxcywh(8, 8, 40, 24, 64, 64), cxcywh(18, 18, 30, 30, 64, 64)])},
    {"boxes": torch.tensor([cxcywh(50, 40, 64, 48, 64, 48)])},
]
IMAGE_SIZES = [(64, 64), (48, 64)]
# Box (8, 8, 40, 24): columns 0..2, rows 0..1 -> 6 cells of 1/6; box (18, 18, 30, 30): cell
# (1, 1) alone -> 1 (the smaller box wins). Box (50, 40, 64, 48) of image 1: columns 3, rows 2.
FG = np.zeros((2, 4, 4))
FG[0, 0:2, 0:3] = 1 / 6
FG[0, 1, 1] = 1.0
FG[1, 2, 3] = 1.0
BG = np.where(FG > 0, 0.0, 1.0)
BG[0] /= 10  # 16 - 6 foreground cells
BG[1] /= 15


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def context_reference(block, fmap):
    """R(F) of one image's map (C, H, W) with explicit sums over the block's float64 weights."""
    w = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    c, h, wd = fmap.shape
    wk, bk = w["attention.weight"][0, :, 0, 0], w["attention.bias"][0]
    logits = np.array([[sum(wk[k] * fmap[k, i, j] for k in range(c)) + bk for j in range(wd)]
                       for i in range(h)])  # fmt: skip
    weights = softmax(logits.ravel()).reshape(h, wd)
    context = np.array([(weights * fmap[k]).sum() for k in range(c)])
    hidden = w["transform.0.weight"][:, :, 0, 0] @ context + w["transform.0.bias"]
    normed = (hidden - hidden.mean()) / math.sqrt(hidden.var() + 1e-5)
    normed = normed * w["transform.1.weight"].ravel() + w["transform.1.bias"].ravel()
    added = w["transform.3.weight"][:, :, 0, 0] @ np.maximum(normed, 0) + w["transform.3.bias"]
    return fmap + added[:, None, None]


def fgd_reference(term, s_map, t_map, temperature, weights):
    """The four FGD losses with loops over images, channels and cells (float64)."""
    alpha, beta, gamma, lam = weights
    conv = term.adapters["res5"]
    cw, cb = conv.weight.double().detach()[:, :, 0, 0].numpy(), conv.bias.double().detach().numpy()
    s_raw, t = s_map.double().detach().numpy(), t_map.double().detach().numpy()
    b, c, h, wd = t.shape
    fg = bg = att = glob = 0.0
    for n in range(b):
        s = np.einsum("oc,chw->ohw", cw, s_raw[n]) + cb[:, None, None]
        att_sp = {}
        att_ch = {}
        for name, f in (("t", t[n]), ("s", s)):
            spatial = np.array([[np.mean(np.abs(f[:, i, j])) for j in range(wd)] for i in range(h)])
            att_sp[name] = h * wd * softmax(spatial.ravel() / temperature).reshape(h, wd)
            channel = np.array([np.mean(np.abs(f[k])) for k in range(c)])
            att_ch[name] = c * softmax(channel / temperature)
        for k in range(c):
            for i in range(h):
                for j in range(wd):
                    sq = (t[n, k, i, j] - s[k, i, j]) ** 2 * att_sp["t"][i, j] * att_ch["t"][k]
                    fg += FG[n, i, j] * sq
                    bg += BG[n, i, j] * sq
        att += np.abs(att_sp["t"] - att_sp["s"]).sum() + np.abs(att_ch["t"] - att_ch["s"]).sum()
        r_t = context_reference(term.teacher_context["res5"], t[n])
        r_s = context_reference(term.student_context["res5"], s)
        glob += ((r_t - r_s) ** 2).sum()
    return {"fg": alpha * fg / b, "bg": beta * bg / b, "attention": gamma * att / b,
            "global": lam * glob / b}  # fmt: skip


def bound_term(**kwargs):
    term = FGDLoss(features=["res5"], **kwargs)
    term.bind(StandInModel({"res5": (3, 16)}), StandInModel({"res5": (5, 16)}))
    return term


class TestFGDMasks(unittest.TestCase):
    def test_hand_worked_masks(self):
        fg, bg = fgd_box_masks(TARGETS, IMAGE_SIZES, 16, (4, 4))
        np.testing.assert_allclose(fg.numpy(), FG, rtol=1e-6)
        np.testing.assert_allclose(bg.numpy(), BG, rtol=1e-6)

    def test_image_without_boxes_is_all_background(self):
        fg, bg = fgd_box_masks([{"boxes": torch.zeros(0, 4)}], [(32, 32)], 16, (2, 3))
        self.assertEqual(fg.abs().sum().item(), 0)
        np.testing.assert_allclose(bg.numpy(), np.full((1, 2, 3), 1 / 6), rtol=1e-6)


class TestFGDFormula(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(0)
        self.s_map = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
        self.t_map = torch.randn(2, 5, 4, 4, generator=gen, requires_grad=True)
        self.weights = (2.0, 0.5, 0.3, 0.7)  # large, so every part counts in the comparison
        self.term = bound_term(temperature=0.5, alpha=2.0, beta=0.5, gamma=0.3, lambda_=0.7)
        with torch.no_grad():  # non-trivial context models (W_2 starts at zero)
            for p in list(self.term.student_context.parameters()) + list(
                self.term.teacher_context.parameters()
            ):
                p.normal_(0.0, 0.3, generator=gen)

    def losses(self, term):
        context = feature_context({"res5": self.s_map}, {"res5": self.t_map}, TARGETS,
                                  IMAGE_SIZES)  # fmt: skip
        return term(context)

    def test_against_float64(self):
        self.assertEqual(FGDLoss.inputs, {"targets", "backbone_features"})
        out = self.losses(self.term)
        expected = fgd_reference(self.term, self.s_map, self.t_map, 0.5, self.weights)
        for part, value in expected.items():
            self.assertGreater(value, 0, part)
            self.assertAlmostEqual(
                out[f"loss_kd_fgd_res5_{part}"].item() / value, 1.0, places=5, msg=part
            )

    def test_gradients_reach_student_and_term_only(self):
        sum(self.losses(self.term).values()).backward()
        self.assertGreater(self.s_map.grad.abs().sum().item(), 0)
        self.assertIsNone(self.t_map.grad)  # the teacher's map is detached
        for name, p in self.term.named_parameters():
            self.assertIsNotNone(p.grad, name)
            if not name.endswith("attention.bias"):  # a softmax ignores a shift: zero gradient
                self.assertGreater(p.grad.abs().sum().item(), 0, name)

    def test_state_dict_round_trip(self):
        other = bound_term(temperature=0.5, alpha=2.0, beta=0.5, gamma=0.3, lambda_=0.7)
        other.load_state_dict(self.term.state_dict())
        first, second = self.losses(self.term), self.losses(other)
        for key in first:
            self.assertEqual(first[key].item(), second[key].item(), key)

    def test_equal_widths_need_no_adapter(self):
        term = FGDLoss(features=["res5"])
        term.bind(StandInModel({"res5": (4, 16)}), StandInModel({"res5": (4, 16)}))
        self.assertEqual(len(term.adapters), 0)
        self.assertEqual(len(term.student_context), 1)


class TestFGDStartUp(unittest.TestCase):
    def test_missing_backbone_feature_is_named(self):
        with self.assertRaisesRegex(ValueError, "FGDLoss.*'res4'.*teacher.*\\['res5'\\]"):
            FGDLoss(features=["res4"]).bind(
                StandInModel({"res4": (3, 16)}), StandInModel({"res5": (5, 32)})
            )

    def test_model_without_backbone(self):
        with self.assertRaisesRegex(ValueError, "FGDLoss.*student.*NoBackboneModel.*backbone"):
            FGDLoss().bind(NoBackboneModel(), StandInModel({"res5": (5, 32)}))

    def test_bad_settings(self):
        with self.assertRaisesRegex(ValueError, "FEATURES is empty"):
            FGDLoss(features=[])
        with self.assertRaisesRegex(ValueError, "TEMPERATURE"):
            FGDLoss(temperature=0.0)


class TestFGDInTraining(unittest.TestCase):
    def test_kd_step_on_demo_pair(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = demo_pair_trainer(
                tmp, "MODEL.KD.LOSSES", "['KDDETRLoss', 'FGDLoss']",
                "MODEL.KD.FGD.FEATURES", "['stage4']",
            )  # fmt: skip
            term = trainer.kd_losses[1]
            self.assertIn("stage4", term.adapters)  # Lite0 112 -> Lite2 120 channels
            self.assertTrue({"targets", "backbone_features"} <= trainer._trainer.kd_inputs)
            term_parameter_checks(self, trainer, term)
            before = {k: v.clone() for k, v in term.state_dict().items()}
            trainer.resume_or_load(resume=False)
            trainer.train()
            losses = logged_losses(trainer)
            for part in ("fg", "bg", "attention", "global"):
                value = losses[f"loss_kd_fgd_stage4_{part}"]
                self.assertTrue(math.isfinite(value) and value > 0, part)
            after = term.state_dict()
            self.assertFalse(torch.equal(before["adapters.stage4.weight"],
                                         after["adapters.stage4.weight"]))  # fmt: skip
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))


if __name__ == "__main__":
    unittest.main()
