# Copyright (c) kd_detr contributors.
"""FitNet hints: the MSE of adapted student features against a float64 computation, adapters
built from the models' widths (student parameters: optimised and checkpointed, never in the
teacher), a start-up error for a feature a model does not output."""
import os
import tempfile
import unittest

import numpy as np
import torch
from torch import nn

from kd_detr.distill import FitNetLoss, KDContext

from .kd_helpers import FixedBatchKDTrainer, kd_cfg, save_teacher
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


class _Shape:
    def __init__(self, channels):
        self.channels = channels


class _Model(nn.Module):
    """The parts of a DETR model FitNetLoss.bind reads."""

    def __init__(self, hidden, channels):
        super().__init__()
        self.hidden_dim = hidden
        self.backbone = type("B", (), {"output_shape": lambda _: {"res5": _Shape(channels)}})()


def context(s_memory, t_memory, mask, s_map, t_map):
    def outputs(memory, fmap):
        return {"encoder": {"memory": memory, "mask": mask, "spatial_shape": (2, 3),
                            "backbone_features": {"res5": fmap}}}  # fmt: skip

    return KDContext(0, [], [], outputs(s_memory, s_map), outputs(t_memory, t_map), False)


class TestFitNetFormula(unittest.TestCase):
    def test_against_float64(self):
        gen = torch.Generator().manual_seed(0)
        term = FitNetLoss(features=["encoder", "res5"], weight=2.0)
        self.assertEqual(term.inputs, {"encoder_memory", "backbone_features"})
        term.bind(_Model(4, 3), _Model(6, 5))
        s_mem = torch.randn(2, 6, 4, generator=gen, requires_grad=True)
        t_mem = torch.randn(2, 6, 6, generator=gen)
        mask = torch.zeros(2, 6, dtype=torch.bool)
        mask[1, 4:] = True  # padding tokens of image 1
        s_map = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
        t_map = torch.randn(2, 5, 2, 2, generator=gen)  # coarser: the adapted map is resized
        out = term(context(s_mem, t_mem, mask, s_map, t_map))

        linear = term.adapters["encoder"]
        w, b = linear.weight.double().detach().numpy(), linear.bias.double().detach().numpy()
        adapted = s_mem.double().detach().numpy() @ w.T + b
        sq = ((adapted - t_mem.double().numpy()) ** 2)[~mask.numpy()]
        self.assertAlmostEqual(out["loss_kd_fitnet_encoder"].item(), 2.0 * sq.mean(), places=5)

        conv = term.adapters["res5"]
        cw = conv.weight.double().detach()[:, :, 0, 0].numpy()
        mapped = np.einsum("oc,bchw->bohw", cw, s_map.double().detach().numpy())
        mapped += conv.bias.double().detach().numpy()[None, :, None, None]
        # bilinear 4x4 -> 2x2 without corner alignment: the mean of each 2x2 block
        resized = mapped.reshape(2, 5, 2, 2, 2, 2).mean(axis=(3, 5))
        expected = 2.0 * ((resized - t_map.double().numpy()) ** 2).mean()
        self.assertAlmostEqual(out["loss_kd_fitnet_res5"].item(), expected, places=5)

        sum(out.values()).backward()
        self.assertTrue(s_mem.grad.abs().sum() > 0 and s_map.grad.abs().sum() > 0)
        self.assertTrue(all(p.grad is not None for p in term.parameters()))

    def test_missing_backbone_feature_is_named(self):
        term = FitNetLoss(features=["res4"])
        with self.assertRaisesRegex(ValueError, "FitNetLoss.*'res4'.*student.*\\['res5'\\]"):
            term.bind(_Model(4, 3), _Model(6, 5))


class TestFitNetInTraining(unittest.TestCase):
    def test_adapters_are_optimised_and_checkpointed(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            cfg = kd_cfg(
                os.path.join(tmp, "run"), weights,
                "MODEL.KD.LOSSES", "['KDDETRLoss', 'FitNetLoss']",
                "MODEL.KD.FITNET.FEATURES", "['encoder', 'res5']",
            )  # fmt: skip
            trainer = FixedBatchKDTrainer(cfg)
            term = trainer.kd_losses[1]
            self.assertEqual(trainer._trainer.kd_inputs,
                             {"points", "encoder_memory", "backbone_features"})  # fmt: skip
            adapter_ids = {id(p) for p in term.parameters()}
            in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            self.assertTrue(adapter_ids <= in_optimizer)
            self.assertFalse(adapter_ids & {id(p) for p in trainer.teacher.parameters()})
            before = term.adapters["encoder"].weight.detach().clone()
            trainer.resume_or_load(resume=False)
            trainer.train()
            self.assertFalse(torch.equal(term.adapters["encoder"].weight, before))  # learned
            saved = torch.load(os.path.join(tmp, "run", "model_final.pth"), weights_only=False)
            self.assertIn("1.adapters.encoder.weight", saved["kd_losses"])
            self.assertIn("1.adapters.res5.weight", saved["kd_losses"])
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))
