# Copyright (c) kd_detr contributors.
"""RegionCLIP-style alignment: pseudo region labels, contrastive and distillation losses,
against hand computations (numpy loops) and scipy / torch.distributions references."""
import math
import os
import tempfile
import unittest

import numpy as np
import torch
from scipy.special import rel_entr
from scipy.special import softmax as np_softmax

from kd_detr.config import load_config
from kd_detr.ov.regionclip import (
    RegionConceptAlignment,
    pseudo_region_labels,
    region_concept_contrastive_loss,
    region_concept_distillation_loss,
)


def _cos_matrix(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


class TestPseudoLabels(unittest.TestCase):
    def setUp(self):
        self.concepts = torch.eye(3)  # concept k = unit vector e_k
        self.teacher = torch.tensor([[2.0, 0.0, 0.0], [0.1, 1.0, 0.2], [1.0, 1.0, 1.1]])

    def test_scores_labels_and_threshold_by_hand(self):
        temperature = 0.5
        pseudo = pseudo_region_labels(self.teacher, self.concepts, temperature, threshold=0.5)
        # region 0 = e_0: logits (2, 0, 0) -> p = e^2 / (e^2 + 2)
        p0 = math.exp(2) / (math.exp(2) + 2)
        self.assertAlmostEqual(pseudo.probs[0, 0].item(), p0, places=6)
        self.assertAlmostEqual(pseudo.probs[0, 1].item(), 1 / (math.exp(2) + 2), places=6)
        for i, row in enumerate(self.teacher.numpy()):
            cos = row / np.linalg.norm(row)  # cosines with the unit concepts
            probs = np.exp(cos / temperature) / np.exp(cos / temperature).sum()
            np.testing.assert_allclose(pseudo.probs[i].numpy(), probs, rtol=1e-5)
            self.assertAlmostEqual(pseudo.scores[i].item(), probs.max(), places=6)
            self.assertEqual(pseudo.labels[i].item(), int(probs.argmax()))
        # tops: 0.787, ~0.73 (region 1), ~0.37 (region 2): threshold 0.5 keeps 0 and 1
        self.assertEqual(pseudo.keep.tolist(), [True, True, False])
        self.assertEqual(pseudo.kept_labels.tolist(), [0, 1])
        strict = pseudo_region_labels(self.teacher, self.concepts, temperature, threshold=p0)
        self.assertFalse(bool(strict.keep[0]))  # strictly above the threshold
        none = pseudo_region_labels(self.teacher, self.concepts, temperature, threshold=0.99)
        self.assertFalse(bool(none.keep.any()))

    def test_callable_teacher_runs_without_gradients(self):
        calls = []
        weight = torch.eye(3, requires_grad=True)

        def teacher():
            calls.append(1)
            return self.teacher @ weight

        pseudo = pseudo_region_labels(teacher, self.concepts, 0.5, 0.5)
        self.assertEqual(len(calls), 1)
        self.assertFalse(pseudo.probs.requires_grad)
        ref = pseudo_region_labels(self.teacher, self.concepts, 0.5, 0.5)
        torch.testing.assert_close(pseudo.probs, ref.probs)
        with self.assertRaisesRegex(ValueError, "same D"):
            pseudo_region_labels(torch.randn(2, 4), self.concepts)


class TestLosses(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(0)
        self.concepts = torch.randn(5, 4, generator=gen)
        self.student = torch.randn(6, 4, generator=gen, requires_grad=True)
        self.teacher = torch.randn(6, 4, generator=gen)
        self.temperature = 0.2

    def test_contrastive_loss_by_hand(self):
        pseudo = pseudo_region_labels(self.teacher, self.concepts, self.temperature, 0.0)
        # fix the pseudo labels by hand: region 2 dropped, labels with a repeated concept
        pseudo.keep = torch.tensor([True, True, False, True, True, True])
        pseudo.labels = torch.tensor([3, 1, 0, 3, 4, 1])
        loss = region_concept_contrastive_loss(
            self.student, self.concepts, pseudo, self.temperature
        )
        kept, labels = [0, 1, 3, 4, 5], [3, 1, 3, 4, 1]
        s = self.student.detach().numpy()[kept]
        cos = _cos_matrix(s, self.concepts.numpy()[labels]) / self.temperature  # (5, 5)
        expected = 0.0
        for i in range(5):
            denom = sum(math.exp(cos[i, j]) for j in range(5))
            positive = sum(math.exp(cos[i, j]) for j in range(5) if labels[j] == labels[i])
            expected += -math.log(positive / denom)
        self.assertAlmostEqual(loss.item(), expected / 5, places=4)
        loss.backward()
        grad = self.student.grad
        self.assertEqual(grad[2].abs().sum().item(), 0.0)  # dropped region
        self.assertGreater(grad[kept].abs().sum().item(), 0.0)

        # distinct labels: the plain cross-entropy over the batch's concepts
        pseudo.labels = torch.tensor([0, 1, 0, 2, 3, 4])
        loss = region_concept_contrastive_loss(
            self.student, self.concepts, pseudo, self.temperature
        )
        logits = torch.from_numpy(
            _cos_matrix(s, self.concepts.numpy()[[0, 1, 2, 3, 4]]) / self.temperature
        )
        ce = torch.nn.functional.cross_entropy(logits, torch.arange(5))
        self.assertAlmostEqual(loss.item(), ce.item(), places=4)

    def test_distillation_matches_scipy_and_torch_kl(self):
        pseudo = pseudo_region_labels(self.teacher, self.concepts, self.temperature, 0.9)
        kept = pseudo.keep.numpy()
        self.assertTrue(0 < kept.sum() < 6)  # a real selection
        loss = region_concept_distillation_loss(
            self.student, self.concepts, pseudo, self.temperature
        )
        p_t = np_softmax(_cos_matrix(self.teacher.numpy(), self.concepts.numpy()) / 0.2, axis=1)
        p_s = np_softmax(
            _cos_matrix(self.student.detach().numpy(), self.concepts.numpy()) / 0.2, axis=1
        )
        expected = rel_entr(p_t[kept], p_s[kept]).sum(axis=1).mean()
        self.assertAlmostEqual(loss.item(), float(expected), places=5)
        dist = torch.distributions
        ref = dist.kl_divergence(
            dist.Categorical(probs=torch.from_numpy(p_t[kept])),
            dist.Categorical(probs=torch.from_numpy(p_s[kept])),
        ).mean()
        self.assertAlmostEqual(loss.item(), ref.item(), places=5)
        every = region_concept_distillation_loss(
            self.student, self.concepts, pseudo, self.temperature, kept_only=False
        )
        self.assertAlmostEqual(every.item(), rel_entr(p_t, p_s).sum(1).mean(), places=5)
        # the teacher equals the student: zero
        same = pseudo_region_labels(self.student.detach(), self.concepts, 0.2, 0.0)
        zero = region_concept_distillation_loss(self.student, self.concepts, same, 0.2)
        self.assertAlmostEqual(zero.item(), 0.0, places=6)

    def test_empty_selection(self):
        pseudo = pseudo_region_labels(self.teacher, self.concepts, self.temperature, 1.0)
        self.assertFalse(bool(pseudo.keep.any()))
        for fn in (region_concept_contrastive_loss, region_concept_distillation_loss):
            loss = fn(self.student, self.concepts, pseudo, self.temperature)
            self.assertEqual(loss.item(), 0.0)
            loss.backward()  # connected to the graph, zero gradient
            self.assertEqual(self.student.grad.abs().sum().item(), 0.0)

    def test_module_from_config(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "concepts.npy")
            np.save(path, self.concepts.numpy())
            cfg = load_config(freeze=False, register_datasets=False)
            cfg.merge_from_list(
                ["MODEL.OV.EMBED_DIM", "4", "MODEL.OV.REGIONCLIP.CONCEPT_EMBEDDINGS", path,
                 "MODEL.OV.REGIONCLIP.TEMPERATURE", "0.2",
                 "MODEL.OV.REGIONCLIP.CONCEPT_THRESHOLD", "0.3",
                 "MODEL.OV.REGIONCLIP.CONTRASTIVE_WEIGHT", "1.0",
                 "MODEL.OV.REGIONCLIP.DISTILL_WEIGHT", "0.5"]
            )  # fmt: skip
            module = RegionConceptAlignment(cfg)
        self.assertEqual(list(module.state_dict()), [])  # the concept pool is not stored
        losses = module(self.student, self.teacher)
        pseudo = pseudo_region_labels(self.teacher, self.concepts, 0.2, 0.3)
        distill = region_concept_distillation_loss(self.student, self.concepts, pseudo, 0.2)
        contrast = region_concept_contrastive_loss(self.student, self.concepts, pseudo, 0.2)
        self.assertAlmostEqual(losses["loss_regionclip_distill"].item(), 0.5 * distill.item(), 5)
        self.assertAlmostEqual(losses["loss_regionclip_contrastive"].item(), contrast.item(), 5)
        sum(losses.values()).backward()
        self.assertGreater(self.student.grad.abs().sum().item(), 0.0)
        self.assertFalse(module.concepts.requires_grad)


if __name__ == "__main__":
    unittest.main()
