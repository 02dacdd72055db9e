# Copyright (c) kd_detr contributors.
"""CTKD (curriculum temperature KD): the gradient-reversal sign and strength, the cosine lambda
schedule, the loss against an independent float64 computation at a fixed temperature (softmax and
sigmoid), the temperature range, a state_dict round trip, gradients to the student and the
temperature only, the EventStorage scalar, and one training step next to KD-DETR's terms."""
import math
import tempfile
import unittest

import numpy as np
import torch

from detectron2.utils.events import EventStorage

from kd_detr.config import load_config
from kd_detr.distill import (
    KD_LOSS_REGISTRY,
    CTKDLoss,
    KDContext,
    PointPair,
    build_kd_losses,
    ctkd_lambda,
    kl_at_temperature,
)

from .kd_helpers import FixedBatchKDTrainer, kd_cfg, save_teacher, synthetic_batch
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


def reference_kl(zs, zt, T, softmax):
    """KL(teacher || student) at T, times T^2, for one point, float64, from the formulas."""
    zs, zt = np.asarray(zs, np.float64) / T, np.asarray(zt, np.float64) / T
    if softmax:
        ps, pt = np.exp(zs - zs.max()), np.exp(zt - zt.max())
        ps, pt = ps / ps.sum(), pt / pt.sum()
        kl = np.sum(pt * np.log(pt / ps))
    else:
        qs, qt = 1 / (1 + np.exp(-zs)), 1 / (1 + np.exp(-zt))
        kl = np.sum(qt * np.log(qt / qs) + (1 - qt) * np.log((1 - qt) / (1 - qs)))
    return float(kl) * T * T


def make_context(iteration, s_logits, t_logits, weights=None, name="g"):
    pair = PointPair(name, {"pred_logits": s_logits}, {"pred_logits": t_logits}, weights)
    return KDContext(
        iteration=iteration, batched_inputs=[], image_sizes=[], student_outputs={},
        teacher_outputs={}, teacher_softmax=True, pairs=[pair],
    )  # fmt: skip


class TestCTKDParts(unittest.TestCase):
    def test_cosine_schedule(self):
        for it, n in ((0, 100), (25, 100), (50, 100), (100, 100), (250, 100)):
            expected = 0.2 + (0.9 - 0.2) * (1 - math.cos(math.pi * min(it, n) / n)) / 2
            self.assertAlmostEqual(ctkd_lambda(it, 0.2, 0.9, n), expected, places=12)
        self.assertEqual(ctkd_lambda(0, 0.0, 1.0, 10), 0.0)
        self.assertAlmostEqual(ctkd_lambda(5, 0.0, 1.0, 10), 0.5)
        self.assertEqual(ctkd_lambda(10, 0.0, 1.0, 10), 1.0)
        self.assertEqual(ctkd_lambda(3, 0.0, 1.0, 0), 1.0)

    def test_grl_sign_and_strength(self):
        gen = torch.Generator().manual_seed(0)
        s_logits = torch.randn(1, 2, 3, 5, generator=gen)
        t_logits = torch.randn(2, 3, 5, generator=gen) * 2
        term = CTKDLoss(softmax=True, lambda_min=0.0, lambda_max=1.0, decay_iters=100)
        # Without reversal: d loss / d theta through T = 1 + 20 sigmoid(theta) directly.
        theta = term.theta.detach().clone().requires_grad_(True)
        temperature = term.t_start + term.t_range * torch.sigmoid(theta)
        kl_at_temperature(s_logits[0], t_logits, temperature, True).mean().backward()
        plain = theta.grad.item()
        self.assertNotEqual(plain, 0.0)
        for iteration in (0, 30, 100):
            term.zero_grad()
            out = term(make_context(iteration, s_logits, t_logits))
            out["loss_kd_ctkd_g"].backward()
            strength = ctkd_lambda(iteration, 0.0, 1.0, 100)
            self.assertAlmostEqual(term.strength, strength)
            self.assertAlmostEqual(term.theta.grad.item(), -strength * plain, places=6)

    def test_loss_against_float64_at_fixed_temperature(self):
        gen = torch.Generator().manual_seed(1)
        num_layers, bsz, m, k = 2, 2, 3, 4
        for softmax in (True, False):
            s_logits = torch.randn(num_layers, bsz, m, k, generator=gen).requires_grad_(True)
            t_logits = torch.randn(bsz, m, k, generator=gen) * 3
            weights = torch.rand(bsz, m, generator=gen)
            term = CTKDLoss(softmax=softmax, theta_init=0.3, weight=0.5)
            T = 1.0 + 20.0 / (1 + math.exp(-0.3))
            out = term.pair_losses({"pred_logits": s_logits}, {"pred_logits": t_logits},
                                   weights, "g")  # fmt: skip
            self.assertEqual(set(out), {"loss_kd_ctkd_g", "loss_kd_ctkd_g_0"})
            w = weights.double().numpy()
            for layer, key in ((0, "loss_kd_ctkd_g_0"), (1, "loss_kd_ctkd_g")):
                total = sum(
                    w[b, i] * reference_kl(s_logits[layer, b, i].detach().numpy(),
                                           t_logits[b, i].numpy(), T, softmax)
                    for b in range(bsz) for i in range(m)
                )  # fmt: skip
                expected = 0.5 * total / w.sum()
                self.assertAlmostEqual(out[key].item(), expected, delta=1e-5 * max(1, expected))

    def test_temperature_range(self):
        for theta in (-100.0, 0.0, 100.0):
            term = CTKDLoss(theta_init=theta)
            value = term.temperature().item()
            self.assertTrue(1.0 <= value <= 21.0, value)
        term = CTKDLoss(mode="instance", num_logits=4)
        with torch.no_grad():
            term.mlp[2].bias.fill_(50.0)
        z = torch.randn(2, 3, 4) * 100
        temps = term.temperature(z, -z)
        self.assertEqual(temps.shape, (2, 3))
        self.assertTrue(bool(((temps >= 1.0) & (temps <= 21.0)).all()))

    def test_state_dict_round_trip(self):
        gen = torch.Generator().manual_seed(2)
        s_logits = torch.randn(1, 2, 3, 6, generator=gen)
        t_logits = torch.randn(2, 3, 6, generator=gen)
        for mode in ("global", "instance"):
            torch.manual_seed(0)
            term = CTKDLoss(mode=mode, num_logits=6, softmax=False)
            with torch.no_grad():
                for p in term.parameters():
                    p.add_(0.37)
            torch.manual_seed(1)
            fresh = CTKDLoss(mode=mode, num_logits=6, softmax=False)
            ctx = make_context(7, s_logits, t_logits)
            self.assertNotAlmostEqual(term(ctx)["loss_kd_ctkd_g"].item(),
                                      fresh(ctx)["loss_kd_ctkd_g"].item(), places=6)  # fmt: skip
            fresh.load_state_dict(term.state_dict())
            self.assertEqual(term(ctx)["loss_kd_ctkd_g"].item(),
                             fresh(ctx)["loss_kd_ctkd_g"].item())  # fmt: skip

    def test_gradients_reach_student_and_temperature_only(self):
        gen = torch.Generator().manual_seed(3)
        for mode in ("global", "instance"):
            s_logits = torch.randn(2, 2, 3, 5, generator=gen).requires_grad_(True)
            t_logits = torch.randn(2, 3, 5, generator=gen).requires_grad_(True)
            term = CTKDLoss(mode=mode, num_logits=5, decay_iters=10)
            out = term(make_context(5, s_logits, t_logits))
            sum(out.values()).backward()
            self.assertIsNone(t_logits.grad)
            self.assertTrue(torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0)
            for name, p in term.named_parameters():
                self.assertIsNotNone(p.grad, name)
                self.assertTrue(torch.isfinite(p.grad).all(), name)

    def test_temperature_logged_to_event_storage(self):
        term = CTKDLoss(theta_init=0.0, decay_iters=10)
        ctx = make_context(5, torch.randn(1, 2, 4), torch.randn(1, 2, 4))
        term(ctx)  # no storage: no error
        with EventStorage(0) as storage:
            term(ctx)
            history = storage.history("kd_ctkd_temperature")
            self.assertAlmostEqual(history.latest(), 11.0, places=5)
            self.assertAlmostEqual(storage.history("kd_ctkd_lambda").latest(), 0.5)

    def test_empty_group(self):
        term = CTKDLoss(mode="instance", num_logits=3)
        out = term(make_context(0, torch.zeros(2, 1, 0, 3), torch.zeros(1, 0, 3)))
        self.assertEqual(out["loss_kd_ctkd_g"].item(), 0.0)


class TestCTKDInTraining(unittest.TestCase):
    def test_config_and_combination_with_kd_detr(self):
        cfg = load_config(freeze=False)
        self.assertEqual((cfg.MODEL.KD.CTKD.T_START, cfg.MODEL.KD.CTKD.T_RANGE), (1.0, 20.0))
        cfg.MODEL.KD.LOSSES = ["CTKDLoss"]
        cfg.MODEL.KD.CTKD.MODE = "instance"
        (term,) = build_kd_losses(cfg)
        self.assertIs(type(term), KD_LOSS_REGISTRY.get("CTKDLoss"))
        self.assertTrue(term.softmax)
        self.assertEqual(term.mlp[0].in_features, 2 * (cfg.MODEL.DETR.NUM_CLASSES + 1))
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            run = kd_cfg(tmp, weights, "MODEL.KD.LOSSES", "['KDDETRLoss', 'CTKDLoss']",
                         "MODEL.KD.CTKD.LR_FACTOR", "50.0")  # fmt: skip
            trainer = FixedBatchKDTrainer(run)
            term = trainer.kd_losses[1]
            # The temperature's own optimizer group: BASE_LR x LR_FACTOR, no weight decay.
            (group,) = [g for g in trainer.optimizer.param_groups
                        if any(p is term.theta for p in g["params"])]  # fmt: skip
            self.assertAlmostEqual(group["initial_lr"], run.SOLVER.BASE_LR * 50.0)
            self.assertEqual((len(group["params"]), group["weight_decay"]), (1, 0.0))
            self.assertFalse(term.softmax)  # tiny DAB-DETR: sigmoid focal
            losses = trainer._trainer.compute_losses(synthetic_batch(2))
            for key in ("loss_kd_ctkd_general", "loss_kd_ctkd_specific_0", "loss_kd_cls_general"):
                self.assertTrue(math.isfinite(losses[key].item()), key)
            sum(losses.values()).backward()
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))
            self.assertIsNotNone(term.theta.grad)
