# Copyright (c) kd_detr contributors.
"""DKD (decoupled KD) against an independent float64 computation of the paper's formula, for
softmax and sigmoid logits; gradients reach the student only; it combines with KD-DETR's terms
in one run and takes the ground-truth class from the similar-foreground pairing."""
import math
import tempfile
import unittest

import numpy as np
import torch

from kd_detr.config import load_config
from kd_detr.distill import KD_LOSS_REGISTRY, DKDLoss, build_kd_losses, similar_foreground_pairs
from kd_detr.modeling.matcher import HungarianMatcher

from .kd_helpers import FixedBatchKDTrainer, kd_cfg, save_teacher, synthetic_batch
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def reference_dkd(zs, zt, target, T, alpha, beta, softmax):
    """The paper's DKD for one point, float64, written from the formulas."""
    zs, zt = np.asarray(zs, np.float64) / T, np.asarray(zt, np.float64) / T
    if softmax:
        ps, pt = np_softmax(zs), np_softmax(zt)
        bs = np.array([ps[target], 1 - ps[target]])
        bt = np.array([pt[target], 1 - pt[target]])
        tckd = float(np.sum(bt * np.log(bt / bs)))
        others = [c for c in range(len(zs)) if c != target]
        qs, qt = np_softmax(zs[others]), np_softmax(zt[others])
        nckd = float(np.sum(qt * np.log(qt / qs)))
    else:
        qs, qt = 1 / (1 + np.exp(-zs)), 1 / (1 + np.exp(-zt))
        kl = qt * np.log(qt / qs) + (1 - qt) * np.log((1 - qt) / (1 - qs))
        tckd = float(kl[target])
        nckd = float(kl.sum() - kl[target])
    return T * T * (alpha * tckd + beta * nckd)


class TestDKDFormula(unittest.TestCase):
    def check(self, softmax):
        gen = torch.Generator().manual_seed(0)
        num_layers, bsz, m, k = 2, 2, 3, 5
        s_logits = torch.randn(num_layers, bsz, m, k, generator=gen).requires_grad_(True)
        t_logits = torch.randn(bsz, m, k, generator=gen) * 2
        weights = torch.rand(bsz, m, generator=gen)
        term = DKDLoss(alpha=0.7, beta=3.0, temperature=2.5, softmax=softmax)
        out = term.pair_losses({"pred_logits": s_logits}, {"pred_logits": t_logits}, weights, "g")
        self.assertEqual(set(out), {"loss_kd_dkd_g", "loss_kd_dkd_g_0"})
        w = weights.double().numpy()
        for layer, key in ((0, "loss_kd_dkd_g_0"), (1, "loss_kd_dkd_g")):
            total = 0.0
            for b in range(bsz):
                for i in range(m):
                    zt = t_logits[b, i].numpy()
                    target = int(np.argmax(zt))
                    total += w[b, i] * reference_dkd(
                        s_logits[layer, b, i].detach().numpy(), zt, target, 2.5, 0.7, 3.0, softmax
                    )
            self.assertAlmostEqual(out[key].item(), total / w.sum(), delta=1e-5 * max(1, total))
        sum(out.values()).backward()
        self.assertTrue(torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0)

    def test_softmax(self):
        self.check(softmax=True)

    def test_sigmoid(self):
        self.check(softmax=False)

    def test_teacher_equal_student_gives_zero(self):
        z = torch.randn(1, 4, 6)
        for softmax in (True, False):
            out = DKDLoss(softmax=softmax).pair_losses(
                {"pred_logits": z.clone()}, {"pred_logits": z}, None, "g"
            )
            self.assertLess(abs(out["loss_kd_dkd_g"].item()), 1e-6)

    def test_ground_truth_target_from_similar_foreground(self):
        gen = torch.Generator().manual_seed(1)
        student = {"pred_logits": torch.randn(1, 1, 4, 3, generator=gen),
                   "pred_boxes": torch.rand(1, 1, 4, 4, generator=gen)}  # fmt: skip
        teacher = {"pred_logits": torch.randn(1, 4, 3, generator=gen),
                   "pred_boxes": torch.rand(1, 4, 4, generator=gen)}  # fmt: skip
        targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.rand(2, 4, generator=gen)}]
        matcher = HungarianMatcher(use_focal=True)
        s_pair, t_pair = similar_foreground_pairs(student, teacher, targets, matcher)
        self.assertEqual(t_pair["gt_labels"].tolist(), [[2, 0]])
        out = DKDLoss(softmax=False, alpha=1.0, beta=0.0, temperature=1.0).pair_losses(
            s_pair, t_pair, None, "p"
        )
        expected = np.mean([
            reference_dkd(s_pair["pred_logits"][0, 0, i].numpy(),
                          t_pair["pred_logits"][0, i].numpy(), label, 1.0, 1.0, 0.0, False)
            for i, label in enumerate([2, 0])
        ])  # fmt: skip
        self.assertAlmostEqual(out["loss_kd_dkd_p"].item(), expected, places=5)


class TestDKDInTraining(unittest.TestCase):
    def test_config_and_combination_with_kd_detr(self):
        cfg = load_config(freeze=False)
        self.assertEqual((cfg.MODEL.KD.DKD.ALPHA, cfg.MODEL.KD.DKD.BETA), (1.0, 8.0))
        cfg.MODEL.KD.LOSSES = ["DKDLoss"]
        (term,) = build_kd_losses(cfg)
        self.assertIs(type(term), KD_LOSS_REGISTRY.get("DKDLoss"))
        self.assertTrue(term.softmax)  # DETR's default softmax classifier
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            run = kd_cfg(tmp, weights, "MODEL.KD.LOSSES", "['KDDETRLoss', 'DKDLoss']")
            trainer = FixedBatchKDTrainer(run)
            self.assertFalse(trainer.kd_losses[1].softmax)  # tiny DAB-DETR: sigmoid focal
            losses = trainer._trainer.compute_losses(synthetic_batch(2))
            for key in ("loss_kd_dkd_general", "loss_kd_dkd_specific_0", "loss_kd_cls_general"):
                self.assertTrue(math.isfinite(losses[key].item()), key)
            sum(losses.values()).backward()
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))
