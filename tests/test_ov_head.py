# Copyright (c) kd_detr contributors.
"""RegionTextClassifier (cosine / temperature logits, background modes, vocabulary swap) and
federated class sampling."""
import json
import os
import tempfile
import unittest

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg

from kd_detr.ov import RegionTextClassifier, add_ov_config, federated_classes
from kd_detr.ov.region_text_classifier import load_class_freq_weight
from tests.common import shared_data


def _vocab(num, dim=8, seed=0):
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed)) * 3.0


class TestRegionTextClassifier(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.text = _vocab(5)
        self.x = torch.randn(4, 12)

    def _by_hand(self, head, x, text, temperature):
        z = head.proj(x)
        z = z / z.norm(dim=1, keepdim=True)
        t = text / text.norm(dim=1, keepdim=True)
        return z @ t.t() / temperature, z

    def test_logits_and_background_modes(self):
        for temperature in (0.01, 0.02):
            head = RegionTextClassifier(12, self.text, temperature=temperature)
            cls_logits, z = self._by_hand(head, self.x, self.text, temperature)
            out = head(self.x)
            self.assertEqual(tuple(out.shape), (4, 6))
            torch.testing.assert_close(out[:, :5], cls_logits, rtol=1e-5, atol=1e-4)
            bg = head.bg_embedding / head.bg_embedding.norm()
            torch.testing.assert_close(out[:, 5], z @ bg / temperature, rtol=1e-5, atol=1e-4)

        zero = RegionTextClassifier(12, self.text, background="zero")
        out = zero(self.x)
        self.assertEqual(tuple(out.shape), (4, 6))
        self.assertTrue(torch.all(out[:, 5] == 0))
        self.assertIsNone(zero.bg_embedding)
        probs = zero.predict_probs(out)
        torch.testing.assert_close(probs, F.softmax(out, dim=1))

        none = RegionTextClassifier(12, self.text, background="none", loss="sigmoid", bias_init=-2)
        out = none(self.x)
        self.assertEqual(tuple(out.shape), (4, 5))
        cls_logits, _ = self._by_hand(none, self.x, self.text, 0.01)
        torch.testing.assert_close(out, cls_logits - 2.0, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(none.predict_probs(out), torch.sigmoid(out))
        with self.assertRaisesRegex(ValueError, "background"):
            RegionTextClassifier(12, self.text, background="none", loss="softmax")

    def test_vocabulary_swap_and_state_dict(self):
        head = RegionTextClassifier(12, self.text)
        keys = set(head.state_dict())
        self.assertEqual(keys, {"proj.weight", "proj.bias", "bg_embedding"})
        params = {k: v.clone() for k, v in head.state_dict().items()}
        new = _vocab(9, seed=1)
        head.set_vocabulary(new)
        self.assertEqual(head(self.x).shape[1], 10)
        for k, v in head.state_dict().items():
            torch.testing.assert_close(v, params[k])
        cls_logits, _ = self._by_hand(head, self.x, new, 0.01)
        torch.testing.assert_close(head(self.x)[:, :9], cls_logits, rtol=1e-5, atol=1e-4)

        # a separate test vocabulary is used in eval mode only
        head.set_vocabulary(self.text, split="train")
        head.set_vocabulary(new, split="test")
        self.assertEqual(head.train()(self.x).shape[1], 6)
        self.assertEqual(head.eval()(self.x).shape[1], 10)
        head.load_state_dict(params)  # loads without the vocabulary
        with self.assertRaisesRegex(ValueError, "text dimension 8"):
            head.set_vocabulary(torch.randn(3, 7))

    def test_gradients(self):
        head = RegionTextClassifier(12, self.text)
        x = self.x.clone().requires_grad_(True)
        logits = head(x)
        loss = head.losses(logits, torch.tensor([0, 2, 5, 4]))["loss_cls"]
        torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 2, 5, 4])))
        loss.backward()
        self.assertGreater(head.proj.weight.grad.abs().sum().item(), 0)
        self.assertGreater(head.bg_embedding.grad.abs().sum().item(), 0)
        self.assertFalse(head.train_vocabulary.requires_grad)
        self.assertIsNone(head.train_vocabulary.grad)
        self.assertNotIn("train_vocabulary", dict(head.named_parameters()))

    def test_sigmoid_and_federated_loss(self):
        freq = torch.tensor([4.0, 1.0, 0.0, 9.0, 1.0])
        head = RegionTextClassifier(
            12, self.text, background="none", loss="sigmoid", use_fed_loss=True,
            fed_loss_num_classes=3, fed_loss_freq_weight=freq,
        )  # fmt: skip
        gt = torch.tensor([1, 5, 5, 1])
        logits = head(self.x)
        gen = torch.Generator().manual_seed(3)
        loss = head.losses(logits, gt, generator=gen)["loss_cls"]
        keep = federated_classes(gt, freq, 3, torch.Generator().manual_seed(3))
        target = F.one_hot(gt, 6)[:, :5].float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        torch.testing.assert_close(loss, bce[:, keep].sum() / 4)

    def test_from_config(self):
        cfg = get_cfg()
        add_ov_config(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "v.npy")
            np.save(path, self.text.numpy().astype(np.float16))
            cfg.MODEL.OV.TEXT_EMBEDDINGS = path
            cfg.MODEL.OV.EMBED_DIM = 8
            cfg.MODEL.OV.BACKGROUND = "zero"
            cfg.MODEL.OV.TEMPERATURE = 0.02
            head = RegionTextClassifier(cfg, 12)
            self.assertEqual((head.num_classes, head.temperature), (5, 0.02))
            cfg.MODEL.OV.EMBED_DIM = 512
            with self.assertRaisesRegex(ValueError, "dimension 8 .* expects 512"):
                RegionTextClassifier(cfg, 12)


class TestFederatedClasses(unittest.TestCase):
    def test_gt_included_rare_excluded_count(self):
        freq = torch.tensor([1.0, 4.0, 0.0, 9.0, 0.0, 16.0, 1.0, 2.0]) ** 0.5
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):
            gt = torch.tensor([4, 4, 1, 8])  # 8 = background
            keep = federated_classes(gt, freq, 5, gen)
            self.assertEqual(len(keep), 5)
            self.assertEqual(len(set(keep.tolist())), 5)
            self.assertTrue({1, 4} <= set(keep.tolist()))  # GT, even with zero weight
            self.assertNotIn(2, keep.tolist())  # zero weight, not GT: never a negative
        # more GT classes than num_sample: all GT, nothing else
        self.assertEqual(federated_classes(torch.tensor([0, 1, 3]), freq, 2).tolist(), [0, 1, 3])
        # fewer classes with weight than requested: only those
        keep = federated_classes(torch.tensor([2]), freq, 8)
        self.assertEqual(keep.tolist(), [0, 1, 2, 3, 5, 6, 7])

    def test_distribution_follows_weights(self):
        counts = torch.tensor([100.0, 400.0, 0.0, 900.0, 1600.0])
        freq = counts**0.5
        gen = torch.Generator().manual_seed(0)
        hits = torch.zeros(5)
        draws = 4000
        for _ in range(draws):
            hits[federated_classes(torch.tensor([], dtype=torch.long), freq, 1, gen)] += 1
        expected = freq / freq.sum()
        torch.testing.assert_close(hits / draws, expected, atol=0.03, rtol=0)
        self.assertEqual(hits[2].item(), 0)

    def test_lvis_freq_weight_zeroes_rare(self):
        path = shared_data("clip_text", "lvis_v1_train_cat_info.json")
        with open(path) as f:
            cats = sorted(json.load(f), key=lambda c: c["id"])
        w = load_class_freq_weight(path, 0.5, zero_rare=True)
        rare = torch.tensor([c["frequency"] == "r" for c in cats])
        self.assertEqual((len(w), int(rare.sum())), (1203, 337))
        self.assertTrue(torch.all(w[rare] == 0))
        counts = torch.tensor([float(c["image_count"]) for c in cats])
        torch.testing.assert_close(w[~rare], counts[~rare] ** 0.5)
        self.assertGreater(load_class_freq_weight(path, 0.5, zero_rare=False)[rare].sum(), 0)
