# Copyright (c) kd_detr contributors.
"""DETR-style optimizer: lr multipliers, weight decay per parameter type, full-model clipping."""
import unittest

import torch
from torch import nn

from kd_detr.config import load_config
from kd_detr.engine.optimizer import build_optimizer, param_groups


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.sampling_offsets = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _cfg(**solver):
    cfg = load_config(freeze=False, register_datasets=False)
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def _settings(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


class TestParamGroups(unittest.TestCase):
    def test_multipliers_and_decay(self):
        model = _Toy()
        cfg = _cfg(BACKBONE_MULTIPLIER=0.1, LR_MULTIPLIERS=["sampling_offsets:0.5"])
        s = _settings(model, param_groups(model, cfg))
        self.assertNotIn("frozen.weight", s)
        self.assertEqual(s["backbone.0.weight"], (1e-4, 1e-4))
        self.assertEqual(s["backbone.1.weight"], (1e-4, 0.0))  # BatchNorm: WEIGHT_DECAY_NORM
        self.assertEqual(s["sampling_offsets.weight"], (5e-4, 1e-4))
        self.assertEqual(s["head.weight"], (1e-3, 1e-4))
        self.assertEqual(s["norm.bias"], (1e-3, 0.0))
        self.assertEqual(len(s), 10)

    def test_bias_settings_follow_detectron2(self):
        model = _Toy()
        s = _settings(model, param_groups(model, _cfg(BIAS_LR_FACTOR=2.0, WEIGHT_DECAY_BIAS=0.0)))
        self.assertEqual(s["head.bias"], (2e-3, 0.0))
        self.assertEqual(s["head.weight"], (1e-3, 1e-4))

    def test_bad_multiplier_entry(self):
        with self.assertRaisesRegex(ValueError, "name_substring:factor"):
            param_groups(_Toy(), _cfg(LR_MULTIPLIERS=["sampling_offsets"]))

    def test_unknown_optimizer(self):
        with self.assertRaisesRegex(ValueError, "ADAMW"):
            build_optimizer(_cfg(OPTIMIZER="LION"), _Toy())


class TestFullModelClipping(unittest.TestCase):
    def test_step_equals_manual_global_norm_clip(self):
        torch.manual_seed(0)
        model, reference = _Toy(), _Toy()
        reference.load_state_dict(model.state_dict())
        cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0)
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
        optimizer = build_optimizer(cfg, model)
        x = torch.randn(2, 4)
        for m in (model, reference):
            (m.head(m.sampling_offsets(x)) * 10).sum().backward()
        optimizer.step()
        params = [p for p in reference.parameters() if p.grad is not None]
        total = torch.norm(torch.stack([p.grad.norm() for p in params]))
        self.assertGreater(total.item(), 0.01)  # the clip is active
        with torch.no_grad():
            for p in params:
                p -= 1e-3 * p.grad * (0.01 / (total + 1e-6))
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)

    def test_detectron2_per_parameter_clipping_still_works(self):
        cfg = _cfg(OPTIMIZER="ADAMW")
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
        optimizer = build_optimizer(cfg, _Toy())
        self.assertIsInstance(optimizer, torch.optim.AdamW)
        self.assertIn("GradientClip", type(optimizer).__name__)


if __name__ == "__main__":
    unittest.main()
