# Copyright (c) kd_detr contributors.
"""MLKD (multi-level logit KD) against an independent float64 numpy computation of the three
levels on tiny inputs (softmax and sigmoid, with and without the confidence mask), the mask's
median rule, gradients to the student only, and one training step next to KD-DETR's terms."""
import math
import tempfile
import unittest

import numpy as np
import torch

from kd_detr.config import load_config
from kd_detr.distill import KD_LOSS_REGISTRY, MLKDLoss, build_kd_losses, mlkd_confidence_mask

from .kd_helpers import FixedBatchKDTrainer, kd_cfg, save_teacher, synthetic_batch
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


def np_probs(z, tau, softmax):
    z = np.asarray(z, np.float64) / tau
    if softmax:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return 1 / (1 + np.exp(-z))


def reference_mlkd(zs, zt, w, temps, weights3, quantile, softmax):
    """The module doc's formulas for one layer, float64: zs, zt (N, K), w (N,)."""
    zs, zt, w = (np.asarray(a, np.float64) for a in (zs, zt, w))
    p1 = np_probs(zt, 1.0, softmax)
    conf = p1[:, :-1].max(-1) if softmax else p1.max(-1)
    keep = conf >= np.quantile(conf, quantile) if quantile > 0 else np.ones(len(conf), bool)
    wm = w * keep
    total = 0.0
    for tau in temps:
        ps, pt = np_probs(zs, tau, softmax), np_probs(zt, tau, softmax)
        if softmax:
            kl = np.sum(pt * np.log(pt / ps), -1)
        else:
            kl = np.sum(pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps)), -1)
        instance = np.sum(wm * kl * tau * tau) / wm.sum()
        ps, pt = ps[keep], pt[keep]
        n, k = ps.shape
        cls = np.sum(((pt.T @ pt - ps.T @ ps) / n) ** 2) / k
        bat = np.sum((pt @ pt.T - ps @ ps.T) ** 2) / n
        total += weights3[0] * instance + weights3[1] * cls + weights3[2] * bat
    return total


class TestMLKDFormula(unittest.TestCase):
    def check(self, softmax, quantile):
        gen = torch.Generator().manual_seed(0)
        num_layers, bsz, m, k = 2, 2, 5, 4
        s_logits = torch.randn(num_layers, bsz, m, k, generator=gen).requires_grad_(True)
        t_logits = (torch.randn(bsz, m, k, generator=gen) * 2).requires_grad_(True)
        weights = torch.rand(bsz, m, generator=gen)
        temps, w3 = (1.0, 2.5, 4.0), (0.7, 3.0, 2.0)
        term = MLKDLoss(temperatures=temps, instance_weight=w3[0], class_weight=w3[1],
                        batch_weight=w3[2], mask_quantile=quantile, softmax=softmax)  # fmt: skip
        out = term.pair_losses({"pred_logits": s_logits}, {"pred_logits": t_logits}, weights, "g")
        self.assertEqual(set(out), {"loss_kd_mlkd_g", "loss_kd_mlkd_g_0"})
        for layer, key in ((0, "loss_kd_mlkd_g_0"), (1, "loss_kd_mlkd_g")):
            expected = reference_mlkd(
                s_logits[layer].detach().reshape(-1, k).numpy(),
                t_logits.detach().reshape(-1, k).numpy(), weights.reshape(-1).numpy(),
                temps, w3, quantile, softmax,
            )
            self.assertAlmostEqual(out[key].item(), expected, delta=1e-5 * max(1, expected))
        sum(out.values()).backward()
        self.assertIsNone(t_logits.grad)
        self.assertTrue(torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0)

    def test_softmax(self):
        self.check(softmax=True, quantile=0.0)

    def test_sigmoid(self):
        self.check(softmax=False, quantile=0.0)

    def test_softmax_masked(self):
        self.check(softmax=True, quantile=0.5)

    def test_sigmoid_masked(self):
        self.check(softmax=False, quantile=0.5)

    def test_mask_keeps_confident_half(self):
        # Sigmoid confidences 0.1 .. 0.9 over 5 points: the median 0.5 and above are kept.
        conf = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
        logits = torch.stack([torch.logit(conf), torch.full((5,), -5.0)], -1)
        mask = mlkd_confidence_mask(logits, 0.5, softmax=False)
        self.assertEqual(mask.tolist(), [0.0, 1.0, 1.0, 0.0, 1.0])
        self.assertEqual(mlkd_confidence_mask(logits, 0.0, softmax=False).tolist(), [1.0] * 5)
        # MASK_KEEP "unconfident": the official code's comparison, the median and below.
        low = mlkd_confidence_mask(logits, 0.5, softmax=False, keep="unconfident")
        self.assertEqual(low.tolist(), [1.0, 0.0, 1.0, 1.0, 0.0])
        with self.assertRaisesRegex(ValueError, "MASK_KEEP"):
            MLKDLoss(mask_keep="high")
        # Softmax: the background (last) logit does not count as confidence.
        logits = torch.tensor([[0.0, 0.0, 9.0], [3.0, 0.0, 0.0]])
        self.assertEqual(mlkd_confidence_mask(logits, 1.0, softmax=True).tolist(), [0.0, 1.0])

    def test_masked_points_do_not_matter(self):
        # Changing the student at a masked point changes nothing.
        gen = torch.Generator().manual_seed(1)
        t_logits = torch.randn(1, 6, 3, generator=gen)
        s_logits = torch.randn(1, 6, 3, generator=gen)
        term = MLKDLoss(mask_quantile=0.5, softmax=False)
        mask = mlkd_confidence_mask(t_logits.reshape(-1, 3), 0.5, softmax=False)
        dropped = int((mask == 0).nonzero()[0])
        changed = s_logits.clone()
        changed[0, dropped] += 5.0
        a = term.pair_losses({"pred_logits": s_logits}, {"pred_logits": t_logits}, None, "g")
        b = term.pair_losses({"pred_logits": changed}, {"pred_logits": t_logits}, None, "g")
        self.assertAlmostEqual(a["loss_kd_mlkd_g"].item(), b["loss_kd_mlkd_g"].item(), places=5)

    def test_teacher_equal_student_gives_zero(self):
        z = torch.randn(2, 4, 6)
        for softmax in (True, False):
            out = MLKDLoss(softmax=softmax).pair_losses(
                {"pred_logits": z.clone()}, {"pred_logits": z}, None, "g"
            )
            self.assertLess(abs(out["loss_kd_mlkd_g"].item()), 1e-6)

    def test_empty_group(self):
        out = MLKDLoss().pair_losses(
            {"pred_logits": torch.zeros(2, 1, 0, 3)}, {"pred_logits": torch.zeros(1, 0, 3)},
            None, "g",
        )
        self.assertEqual(out["loss_kd_mlkd_g"].item(), 0.0)


class TestMLKDInTraining(unittest.TestCase):
    def test_config_and_combination_with_kd_detr(self):
        cfg = load_config(freeze=False)
        self.assertEqual(list(cfg.MODEL.KD.MLKD.TEMPERATURES), [1.0, 2.0, 3.0, 5.0, 6.0])
        cfg.MODEL.KD.LOSSES = ["MLKDLoss"]
        (term,) = build_kd_losses(cfg)
        self.assertIs(type(term), KD_LOSS_REGISTRY.get("MLKDLoss"))
        self.assertTrue(term.softmax)
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            run = kd_cfg(tmp, weights, "MODEL.KD.LOSSES", "['KDDETRLoss', 'MLKDLoss']")
            trainer = FixedBatchKDTrainer(run)
            self.assertFalse(trainer.kd_losses[1].softmax)
            losses = trainer._trainer.compute_losses(synthetic_batch(2))
            for key in ("loss_kd_mlkd_general", "loss_kd_mlkd_specific_0", "loss_kd_cls_general"):
                self.assertTrue(math.isfinite(losses[key].item()), key)
            sum(losses.values()).backward()
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))
