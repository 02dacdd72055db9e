# Copyright (c) kd_detr contributors.
"""KDEP (SVD + power temperature scaling aligned feature KD): the loss against numpy's SVD with
explicit loops, the sign convention (targets do not depend on the signs the decomposition
returns), rank-deficient batches, gradients to the student only, no parameters, start-up errors
(missing feature, student wider than teacher), one KD step on the demo pair."""
import math
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch

from kd_detr.distill import KDEPLoss, kdep_targets, svd_basis

from .kd_feature_helpers import StandInModel, demo_pair_trainer, feature_context, logged_losses
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


def kdep_reference(s, t, weight, tau, power):
    """KDEP's loss of student (B, C_s, H, W) and teacher (B, C_t, H, W) float64 numpy maps: numpy
    SVD, the largest-entry-positive sign rule, projection and PTS by loops, mean squared error."""
    b, k, h, w = s.shape
    rows = [t[n, :, i, j] for n in range(b) for i in range(h) for j in range(w)]
    x = np.array(rows)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:k].T.copy()
    for col in range(k):
        if basis[np.argmax(np.abs(basis[:, col])), col] < 0:
            basis[:, col] *= -1
    total, count = 0.0, 0
    for r, (n, i, j) in enumerate((n, i, j) for n in range(b) for i in range(h) for j in range(w)):
        for col in range(k):
            p = sum(centred[r, c] * basis[c, col] for c in range(x.shape[1]))
            target = math.copysign(abs(p / tau) ** (1 / power), p)
            total += (s[n, col, i, j] - target) ** 2
            count += 1
    return weight * total / count


def maps(seed, student_shape, teacher_shape):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*student_shape, generator=gen, requires_grad=True)
    # Teacher channels of distinct scales: well separated singular values.
    scales = torch.tensor([3.0, 2.0, 1.2, 0.7, 0.3])[: teacher_shape[1]]
    t = (torch.randn(*teacher_shape, generator=gen) * scales[None, :, None, None] + 0.5)
    return s, t.requires_grad_()


class TestKDEPFormula(unittest.TestCase):
    def test_against_numpy_svd(self):
        self.assertEqual(KDEPLoss.inputs, {"backbone_features"})
        s, t = maps(0, (2, 3, 2, 3), (2, 5, 2, 3))
        term = KDEPLoss(features=["res5"], weight=2.5, pts_temperature=0.2, pts_power=2.0)
        out = term(feature_context({"res5": s}, {"res5": t}))["loss_kd_kdep_res5"].item()
        expected = kdep_reference(s.detach().double().numpy(), t.detach().double().numpy(),
                                  2.5, 0.2, 2.0)  # fmt: skip
        self.assertAlmostEqual(out / expected, 1.0, places=5)

    def test_student_map_resized_to_the_teachers_grid(self):
        s, t = maps(1, (2, 3, 4, 6), (2, 5, 2, 3))
        out = KDEPLoss(features=["res5"])(feature_context({"res5": s}, {"res5": t}))
        # bilinear 4x6 -> 2x3 without corner alignment: the mean of each 2x2 block
        pooled = s.detach().double().numpy().reshape(2, 3, 2, 2, 3, 2).mean(axis=(3, 5))
        expected = kdep_reference(pooled, t.detach().double().numpy(), 3.0, 0.1, 3.0)
        self.assertAlmostEqual(out["loss_kd_kdep_res5"].item() / expected, 1.0, places=5)

    def test_gradients_reach_student_only_and_no_parameters(self):
        s, t = maps(2, (2, 3, 2, 3), (2, 5, 2, 3))
        term = KDEPLoss(features=["res5"])
        term(feature_context({"res5": s}, {"res5": t}))["loss_kd_kdep_res5"].backward()
        self.assertGreater(s.grad.abs().sum().item(), 0)
        self.assertIsNone(t.grad)
        self.assertEqual(list(term.parameters()), [])
        self.assertEqual(term.state_dict(), {})  # nothing to checkpoint


class TestKDEPSigns(unittest.TestCase):
    def setUp(self):
        self.rows = maps(3, (1, 1, 1, 1), (2, 5, 3, 3))[1].detach().permute(0, 2, 3, 1)
        self.rows = self.rows.reshape(-1, 5)

    def test_basis_is_orthonormal_with_positive_largest_entries(self):
        mean, basis = svd_basis(self.rows, 3)
        torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(mean, self.rows.double().mean(0))
        largest = basis.gather(0, basis.abs().argmax(0, keepdim=True))
        self.assertTrue((largest > 0).all())

    def test_targets_ignore_the_signs_the_decomposition_returns(self):
        expected = kdep_targets(self.rows, 3)
        eigh = torch.linalg.eigh

        def flipped(matrix):  # the same decomposition with other (valid) vector signs
            values, vectors = eigh(matrix)
            signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=vectors.dtype)
            return values, vectors * signs

        with mock.patch("torch.linalg.eigh", flipped):
            torch.testing.assert_close(kdep_targets(self.rows, 3), expected)
        # X and -X share their singular vectors: the coordinates change sign, the basis does not.
        torch.testing.assert_close(svd_basis(-self.rows, 3)[1], svd_basis(self.rows, 3)[1])
        torch.testing.assert_close(kdep_targets(-self.rows, 3), -expected)

    def test_fewer_rows_than_the_students_width(self):
        targets = kdep_targets(self.rows[:2], 3)  # rank 1 after centring
        self.assertEqual(tuple(targets.shape), (2, 3))
        self.assertTrue(torch.isfinite(targets).all())
        self.assertLess(targets[:, 1:].abs().max().item(), 1e-3)  # no variance left there


class TestKDEPStartUp(unittest.TestCase):
    def test_student_wider_than_teacher(self):
        with self.assertRaisesRegex(ValueError, "KDEPLoss.*'res5'.*512 channels.*wider \\(2048\\)"):
            KDEPLoss().bind(StandInModel({"res5": (2048, 32)}), StandInModel({"res5": (512, 32)}))

    def test_missing_backbone_feature_is_named(self):
        with self.assertRaisesRegex(ValueError, "KDEPLoss.*'res4'.*student.*\\['res5'\\]"):
            KDEPLoss(features=["res4"]).bind(
                StandInModel({"res5": (512, 32)}), StandInModel({"res4": (1024, 16)})
            )

    def test_bad_settings(self):
        with self.assertRaisesRegex(ValueError, "PTS_TEMPERATURE"):
            KDEPLoss(pts_temperature=0.0)


class TestKDEPInTraining(unittest.TestCase):
    def test_kd_step_on_demo_pair(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = demo_pair_trainer(
                tmp, "MODEL.KD.LOSSES", "['KDDETRLoss', 'KDEPLoss']",
                "MODEL.KD.KDEP.FEATURES", "['stage4']",
            )  # fmt: skip
            self.assertIn("backbone_features", trainer._trainer.kd_inputs)
            trainer.resume_or_load(resume=False)
            trainer.train()
            value = logged_losses(trainer)["loss_kd_kdep_stage4"]
            self.assertTrue(math.isfinite(value) and value > 0)
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))


if __name__ == "__main__":
    unittest.main()
