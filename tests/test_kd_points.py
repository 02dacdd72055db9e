# Copyright (c) kd_detr contributors.
"""Distillation points: deterministic general boxes and the teacher's specific queries."""
import io
import os
import unittest

import numpy as np
import torch
from scipy import stats

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from kd_detr.config import load_config
from kd_detr.distill import DistillationPointSampler, add_kd_config, specific_points

from .common import REPO_ROOT

DAB_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")


def logit_normal_moments():
    """Mean and std of sigmoid(x), x ~ N(0, 1), by quadrature."""
    x = np.linspace(-10, 10, 200001)
    density = stats.norm.pdf(x)
    s = 1 / (1 + np.exp(-x))
    mean = np.trapz(s * density, x)
    return mean, np.sqrt(np.trapz((s - mean) ** 2 * density, x))


class TestGeneralPoints(unittest.TestCase):
    def test_deterministic_across_calls_and_ranks(self):
        rank0 = DistillationPointSampler(num_points=7, seed=3)
        rank1 = DistillationPointSampler(num_points=7, seed=3)  # another process, same config
        torch.manual_seed(0)  # the global RNG plays no role
        a = rank0.sample(11)
        torch.manual_seed(1)
        torch.testing.assert_close(rank1.sample(11), a, rtol=0, atol=0)
        torch.testing.assert_close(rank0.sample(11), a, rtol=0, atol=0)
        self.assertEqual(a.shape, (1, 7, 4))
        self.assertFalse(torch.equal(rank0.sample(12), a))
        self.assertFalse(torch.equal(DistillationPointSampler(num_points=7, seed=4).sample(11), a))
        group = rank0.group(11, batch_size=2)
        self.assertEqual(group["boxes"].shape, (2, 7, 4))
        self.assertIsNone(group["content"])
        self.assertFalse(torch.equal(group["boxes"][0], group["boxes"][1]))
        self.assertEqual(rank0.sample(11, dtype=torch.float64).dtype, torch.float64)

    def test_sigmoid_normal_distribution(self):
        boxes = DistillationPointSampler(num_points=10000).sample(0)[0].double()
        self.assertTrue(((boxes > 0) & (boxes < 1)).all())
        mean, std = logit_normal_moments()  # ~0.5, ~0.2083
        for k in range(4):
            values = boxes[:, k]
            self.assertAlmostEqual(values.mean().item(), mean, delta=0.01)
            self.assertAlmostEqual(values.std().item(), std, delta=0.01)
            # logit(box) ~ N(0, 1)
            pvalue = stats.kstest(torch.logit(values).numpy(), "norm").pvalue
            self.assertGreater(pvalue, 1e-3)

    def test_uniform_distribution_and_size_range(self):
        sampler = DistillationPointSampler(
            num_points=10000, distribution="uniform", size_range=(0.1, 0.5)
        )
        boxes = sampler.sample(5)[0].double()
        for k in range(2):
            self.assertAlmostEqual(boxes[:, k].mean().item(), 0.5, delta=0.01)
            self.assertAlmostEqual(boxes[:, k].std().item(), 1 / np.sqrt(12), delta=0.01)
            self.assertTrue(((boxes[:, k] >= 0) & (boxes[:, k] < 1)).all())
        for k in range(2, 4):
            self.assertAlmostEqual(boxes[:, k].mean().item(), 0.3, delta=0.01)
            self.assertAlmostEqual(boxes[:, k].std().item(), 0.4 / np.sqrt(12), delta=0.01)
            self.assertTrue(((boxes[:, k] > 0.1) & (boxes[:, k] <= 0.5)).all())
        clamped = DistillationPointSampler(num_points=1000, size_range=(0.3, 0.6)).sample(0)
        self.assertTrue(((clamped[..., 2:] >= 0.3) & (clamped[..., 2:] <= 0.6)).all())
        self.assertTrue(
            (DistillationPointSampler(distribution="uniform").sample(0)[..., 2:] > 0).all()
        )

    def test_state_dict_round_trip_and_config(self):
        cfg = get_cfg()
        add_kd_config(cfg)
        cfg.MODEL.KD.SEED, cfg.MODEL.KD.GENERAL.NUM_POINTS = 9, 5
        saved = DistillationPointSampler(cfg)
        self.assertEqual(
            (saved.num_points, saved.seed, saved.distribution), (5, 9, "sigmoid_normal")
        )
        buffer = io.BytesIO()
        torch.save(saved.state_dict(), buffer)
        buffer.seek(0)
        resumed = DistillationPointSampler(num_points=5, seed=0)
        with self.assertLogs("kd_detr.distill.points", "WARNING"):
            resumed.load_state_dict(torch.load(buffer))
        torch.testing.assert_close(resumed.sample(100), saved.sample(100), rtol=0, atol=0)
        self.assertEqual(resumed.state_dict(), saved.state_dict())

    def test_invalid_settings(self):
        with self.assertRaisesRegex(ValueError, "DISTRIBUTION"):
            DistillationPointSampler(distribution="gaussian")
        with self.assertRaisesRegex(ValueError, "SIZE_RANGE"):
            DistillationPointSampler(size_range=(0.5, 0.2))


class TestSpecificPoints(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cfg = load_config(DAB_CONFIG, freeze=False, register_datasets=False)
        torch.manual_seed(0)
        cls.teacher = build_model(cfg)  # training mode, anchors require grad
        cls.student = build_model(cfg).eval()
        gen = torch.Generator().manual_seed(0)
        cls.images = (torch.randn(2, 3, 64, 64, generator=gen), torch.zeros(2, 64, 64).bool())

    def test_dab_anchors(self):
        outputs = self.teacher.forward_raw(self.images)
        anchors = self.teacher.refpoint_embed.weight.sigmoid()  # (Q, 4)
        points = specific_points(outputs, student_hidden_dim=64)
        self.assertEqual(points["boxes"].shape, (2, 10, 4))
        torch.testing.assert_close(points["boxes"], anchors[None].expand(2, -1, -1).detach())
        self.assertFalse(points["boxes"].requires_grad)
        self.assertIsNone(points["content"])  # DAB-DETR without patterns: zero content
        # Only the boxes are shared: the student decodes them as its own anchors.
        with torch.no_grad():
            student = self.student.forward_raw(self.images, [points])
        torch.testing.assert_close(student["groups"][0]["reference_boxes"][0], points["boxes"])

    def test_content_shared_only_when_sizes_match(self):
        outputs = {"layers": {"reference_boxes": torch.rand(2, 2, 3, 4, requires_grad=True)}}
        content = torch.randn(1, 3, 64, requires_grad=True)
        same = specific_points(outputs, 64, teacher_content=content)
        self.assertFalse(same["content"].requires_grad)
        torch.testing.assert_close(same["content"], content.detach())
        self.assertIsNone(specific_points(outputs, 32, teacher_content=content)["content"])
        with self.assertRaises(ValueError):
            specific_points(outputs, 64, teacher_content=torch.randn(1, 4, 64))
        with self.assertRaisesRegex(ValueError, "reference_boxes"):
            specific_points({"layers": {"pred_boxes": torch.rand(2, 2, 3, 4)}}, 64)


if __name__ == "__main__":
    unittest.main()
