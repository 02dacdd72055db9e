# Copyright (c) kd_detr contributors.
"""ViLD heads: ViLD-text loss and inference, ViLD-image loss, ViLD-ensemble scores, against hand
computations."""
import math
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from kd_detr.ov import RegionTextClassifier, ViLDOutputLayers, vild_ensemble, vild_image_loss
from kd_detr.ov.vild_output_layers import base_class_mask, load_novel_category_mask
from tests.common import shared_data
from tests.vild_helpers import tiny_vild_roi_cfg


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _predictor(train, test=None, *, ensemble=False, novel=None, bg_loss_weight=1.0, in_dim=12):
    classifier = RegionTextClassifier(
        in_dim, train, test_text_embeddings=test, temperature=0.05, bg_loss_weight=bg_loss_weight
    )
    return ViLDOutputLayers(
        ShapeSpec(channels=in_dim),
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        classifier=classifier,
        novel_category_mask=novel,
        ensemble=ensemble,
        test_score_thresh=0.0,
        test_nms_thresh=1.0,
        test_topk_per_image=-1,
    )


def _proposals(gt_classes, size=(64, 64)):
    n = len(gt_classes)
    p = Instances(size)
    boxes = [[2.0 + 5 * i, 3.0, 20.0 + 7 * i, 30.0] for i in range(n)]
    p.proposal_boxes = Boxes(torch.tensor(boxes))
    p.gt_boxes = Boxes(p.proposal_boxes.tensor + 1.5)
    p.gt_classes = torch.tensor(gt_classes)
    return p


class TestEnsembleAndMasks(unittest.TestCase):
    def test_ensemble_matches_hand_computation(self):
        # cubes make the geometric means exact: 0.512 = 0.8^3, 0.125 = 0.5^3, ...
        text = torch.tensor([[0.512, 0.512], [0.027, 0.027]])
        image = torch.tensor([[0.125, 0.125], [0.343, 0.343]])
        base = torch.tensor([True, False])
        out = vild_ensemble(text, image, base)
        # base: text^(2/3) image^(1/3); novel: text^(1/3) image^(2/3)
        expected = torch.tensor([[0.8**2 * 0.5, 0.8 * 0.5**2], [0.3**2 * 0.7, 0.3 * 0.7**2]])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
        half = vild_ensemble(text, image, base, weight=0.5)
        torch.testing.assert_close(half, (text * image).sqrt())
        with self.assertRaisesRegex(ValueError, "shapes disagree"):
            vild_ensemble(text, image[:, :1], base)

    def test_base_mask_from_vocabularies(self):
        vocab = _unit(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))
        mask = base_class_mask(vocab, vocab[[2, 0]])
        self.assertEqual(mask.tolist(), [True, False, True, False])

    def test_lvis_rare_classes_are_novel(self):
        mask = load_novel_category_mask(shared_data("clip_text", "lvis_v1_train_cat_info.json"))
        self.assertEqual((len(mask), int(mask.sum())), (1203, 337))


class TestViLDOutputLayers(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(3)
        self.train = torch.randn(5, 8, generator=gen)
        # test vocabulary: the 5 training classes (scaled: still the same unit rows) + 2 novel
        self.test = torch.cat([self.train[[3, 0, 1, 4, 2]] * 2.0, torch.randn(2, 8, generator=gen)])
        self.x = torch.randn(6, 12)

    def _logits(self, head, vocab):
        z = _unit(head.cls_score.proj(self.x))
        bg = z @ (head.cls_score.bg_embedding / head.cls_score.bg_embedding.norm())
        return torch.cat([z @ _unit(vocab).t(), bg[:, None]], dim=1) / 0.05, z

    def test_loss_with_background_weight(self):
        head = _predictor(self.train, bg_loss_weight=0.25)
        gt = [0, 5, 3, 5, 1, 5]  # 5 = background
        proposals = [_proposals(gt[:4]), _proposals(gt[4:])]
        with EventStorage():
            losses = head.losses(head(self.x), proposals)
        logits, _ = self._logits(head, self.train)
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        weights = torch.tensor([0.25 if c == 5 else 1.0 for c in gt])
        nll = -logp[torch.arange(6), torch.tensor(gt)]
        expected = (weights * nll).sum() / weights.sum()
        torch.testing.assert_close(losses["loss_cls"], expected, rtol=1e-5, atol=1e-5)
        self.assertEqual(head.bbox_pred.out_features, 4)  # class-agnostic
        self.assertGreater(losses["loss_box_reg"].item(), 0)
        with EventStorage():
            bg_only = head.losses(head(self.x), [_proposals([5] * 6)])
        self.assertEqual(float(bg_only["loss_box_reg"]), 0.0)

    def test_novel_classes_masked_in_training(self):
        novel = torch.tensor([False, True, False, False, True])
        head = _predictor(self.train, novel=novel)
        gt = [0, 2, 5, 3, 5, 0]
        logits, deltas = head(self.x)
        logits.retain_grad()
        with EventStorage():
            loss = head.losses((logits, deltas), [_proposals(gt)])["loss_cls"]
        loss.backward()
        keep = [0, 2, 3, 5]  # columns 1 and 4 are novel
        sub = logits.detach()[:, keep]
        target = torch.tensor([keep.index(c) for c in gt])
        logp = sub - torch.logsumexp(sub, dim=1, keepdim=True)
        expected = -logp[torch.arange(6), target].mean()
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
        self.assertTrue(torch.all(logits.grad[:, [1, 4]] == 0))
        self.assertTrue(torch.all(logits.grad[:, keep].abs().sum(0) > 0))

    def test_vocabulary_follows_mode_and_is_not_saved(self):
        head = _predictor(self.train, self.test)
        self.assertEqual(head.num_classes, 5)
        head.eval()
        self.assertEqual(head.num_classes, 7)
        self.assertEqual(head.novel_mask().tolist(), [False] * 5 + [True] * 2)
        self.assertEqual(tuple(head(self.x)[0].shape), (6, 8))
        state = head.state_dict()
        self.assertFalse([k for k in state if "vocabulary" in k])
        other = _predictor(self.train[:3])  # another vocabulary: same parameters
        other.load_state_dict(state, strict=True)
        torch.testing.assert_close(other.cls_score.proj.weight, head.cls_score.proj.weight)

    def test_ensemble_inference_matches_hand_computation(self):
        head = _predictor(self.train, self.test, ensemble=True).eval()
        proposals = [_proposals([0, 0, 0]), _proposals([0, 0, 0])]
        image_emb = _unit(torch.randn(6, 8))
        with torch.no_grad():
            predictions = head(self.x)
            (inst0, inst1), (idx0, idx1) = head.inference(predictions, proposals, image_emb)
            logits, _ = self._logits(head, self.test)
        text = F.softmax(logits, dim=1)[:, :7]
        image = F.softmax(image_emb @ _unit(self.test).t() / 0.05, dim=1)
        expected = torch.empty(6, 7)
        for c in range(7):
            w = 2 / 3 if c < 5 else 1 / 3  # classes 0-4 are base, 5-6 novel
            expected[:, c] = text[:, c] ** w * image[:, c] ** (1 - w)
        self.assertEqual((len(inst0), len(inst1)), (21, 21))  # 3 proposals x 7 classes each
        for inst, idx, offset in ((inst0, idx0, 0), (inst1, idx1, 3)):
            got = inst.scores
            want = expected[idx + offset, inst.pred_classes]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        with self.assertRaisesRegex(ValueError, "image-branch embeddings"):
            head.inference(predictions, proposals)


class TestViLDROIHeads(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kd_vild_heads_")
        gen = torch.Generator().manual_seed(0)
        cls.emb = os.path.join(cls.tmp, "emb.npy")
        np.save(cls.emb, torch.randn(3, 8, generator=gen).numpy())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _cfg(self, **vild):
        return tiny_vild_roi_cfg(self.emb, **vild)

    def _inputs(self):
        torch.manual_seed(0)
        features = {"p3": torch.randn(2, 4, 8, 8)}
        proposals, targets, regions = [], [], []
        for i in range(2):
            p = Instances((64, 64))
            p.proposal_boxes = Boxes(torch.tensor([[4.0, 4, 30, 40], [10, 12, 50, 60]]))
            p.objectness_logits = torch.zeros(2)
            t = Instances((64, 64))
            t.gt_boxes = Boxes(torch.tensor([[5.0, 5, 30, 40]]))
            t.gt_classes = torch.tensor([i])
            r = Instances((64, 64))
            r.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 20, 20], [8, 16, 56, 60]])[: i + 1])
            r.clip_embeds = torch.randn(i + 1, 8) * 3
            proposals.append(p)
            targets.append(t)
            regions.append(r)
        return features, proposals, targets, regions

    def _losses(self, heads):
        features, proposals, targets, regions = self._inputs()
        heads.train()
        with EventStorage(), heads.distill_regions(regions):
            _, losses = heads(None, features, proposals, targets)
        pooled = heads.box_pooler([features["p3"]], [r.proposal_boxes for r in regions])
        if heads.image_box_head is None:
            emb = heads.box_predictor.cls_score.proj(heads.box_head(pooled))
        else:
            emb = heads.image_projection(heads.image_box_head(pooled))
        target = _unit(torch.cat([r.clip_embeds for r in regions]))
        expected = 0.5 * (_unit(emb) - target).abs().sum(1).mean()  # 3 regions
        return losses, expected

    def test_image_loss_shared_branch(self):
        heads = build_roi_heads(self._cfg(), {"p3": ShapeSpec(channels=4, stride=8)})
        losses, expected = self._losses(heads)
        self.assertEqual(set(losses), {"loss_cls", "loss_box_reg", "loss_vild_image"})
        torch.testing.assert_close(losses["loss_vild_image"], expected, rtol=1e-5, atol=1e-6)
        losses["loss_vild_image"].backward()
        self.assertGreater(float(heads.box_predictor.cls_score.proj.weight.grad.abs().sum()), 0)
        features, proposals, targets, _ = self._inputs()
        with EventStorage(), self.assertRaisesRegex(ValueError, "ViLDRCNN"):
            heads(None, features, proposals, targets)

    def test_image_loss_separate_branch_and_ensemble(self):
        cfg = self._cfg(IMAGE_BRANCH="separate", ENSEMBLE=True)
        heads = build_roi_heads(cfg, {"p3": ShapeSpec(channels=4, stride=8)})
        losses, expected = self._losses(heads)
        torch.testing.assert_close(losses["loss_vild_image"], expected, rtol=1e-5, atol=1e-6)
        losses["loss_vild_image"].backward()
        self.assertGreater(float(heads.image_projection.weight.grad.abs().sum()), 0)
        self.assertIsNone(heads.box_predictor.cls_score.proj.weight.grad)
        heads.eval()
        features, proposals, _, _ = self._inputs()
        with torch.no_grad():
            detections, _ = heads(None, features, proposals)
        self.assertEqual(len(detections), 2)
        self.assertTrue(all(d.pred_classes.max() < 3 for d in detections if len(d)))

    def test_config_errors(self):
        shape = {"p3": ShapeSpec(channels=4, stride=8)}
        cfg = self._cfg()
        cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
        with self.assertRaisesRegex(ValueError, "CLS_AGNOSTIC_BBOX_REG True"):
            build_roi_heads(cfg, shape)
        cfg = self._cfg()
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 48
        with self.assertRaisesRegex(ValueError, "has 3 classes .*NUM_CLASSES is 48"):
            build_roi_heads(cfg, shape)
        with self.assertRaisesRegex(ValueError, "IMAGE_BRANCH 'separate'"):
            build_roi_heads(self._cfg(ENSEMBLE=True), shape)
        with self.assertRaisesRegex(ValueError, "IMAGE_BRANCH must be one of"):
            build_roi_heads(self._cfg(IMAGE_BRANCH="double"), shape)

    def test_image_loss_function(self):
        a = _unit(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        b = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
        # |0.6-0| + |0.8-1| = 0.8 for the first region, 0 for the second
        torch.testing.assert_close(vild_image_loss(a, b), torch.tensor(0.4))
        empty = torch.zeros(0, 2, requires_grad=True)
        self.assertEqual(float(vild_image_loss(empty, torch.zeros(0, 2))), 0.0)
        self.assertTrue(math.isfinite(float(vild_image_loss(a, b * 0 + 1))))


if __name__ == "__main__":
    unittest.main()
