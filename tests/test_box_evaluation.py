# Copyright (c) kd_detr contributors.
"""Box evaluation (``kd_detr.distill.box_evaluation``): each model's evaluation of given boxes
equals what the model computes by its own path, and the classifier-type conversions against
hand values."""
import math
import os
import unittest

import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from kd_detr.distill import (
    BOX_EVALUATOR_REGISTRY,
    DETRBoxEvaluator,
    RCNNBoxEvaluator,
    build_box_evaluator,
    convert_class_logits,
    fixed_count_boxes,
    sigmoid_to_softmax_logits,
    softmax_to_sigmoid_logits,
)

from .common import REPO_ROOT
from .kd_helpers import synthetic_batch, tiny_cfg
from .model_helpers import config_from, perturb_box_heads, single_thread_module

setUpModule, tearDownModule = single_thread_module()

RCNN_CONFIG = os.path.join(REPO_ROOT, "configs", "demo", "faster_rcnn_efflite0_fpn_demo.yaml")
# The demo Faster R-CNN (EfficientNet-Lite0 + FPN, 4 classes) without ImageNet weights or data.
RCNN_OPTS = [
    "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.RPN.PRE_NMS_TOPK_TEST", "50",
]  # fmt: skip


def tiny_rcnn(*opts, seed=0):
    torch.manual_seed(seed)
    model = build_model(config_from(RCNN_CONFIG, *RCNN_OPTS, *opts))
    with torch.no_grad():  # non-trivial deltas
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.01)
        model.roi_heads.box_predictor.bbox_pred.bias.normal_(std=1.0)
    return model.eval()


def tiny_dab_detr(seed=0):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg())
    perturb_box_heads([model.bbox_embed])
    return model.eval()


def random_boxes(batch, num, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch, num, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(batch, num, 2, generator=gen) * 0.3 + 0.1
    return torch.cat([centre, size], dim=-1)


class TestClassConversion(unittest.TestCase):
    def test_sigmoid_to_softmax_against_hand_values(self):
        # p = (0.5, 0.75): z = (0, ln 3).
        z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
        # product: b = 0.5 * 0.25 = 0.125; total 1.375.
        q = sigmoid_to_softmax_logits(z, "product").softmax(-1)
        expected = torch.tensor([[0.5, 0.75, 0.125]], dtype=torch.float64) / 1.375
        torch.testing.assert_close(q, expected, rtol=1e-12, atol=1e-12)
        # max: b = 1 - 0.75 = 0.25; total 1.5.
        q = sigmoid_to_softmax_logits(z, "max").softmax(-1)
        expected = torch.tensor([[1 / 3, 1 / 2, 1 / 6]], dtype=torch.float64)
        torch.testing.assert_close(q, expected, rtol=1e-12, atol=1e-12)
        self.assertEqual(q.dtype, torch.float64)

    def test_softmax_to_sigmoid_against_hand_values(self):
        z = torch.tensor([[math.log(0.2), math.log(0.3), math.log(0.5)]], dtype=torch.float64)
        out = softmax_to_sigmoid_logits(z)
        expected = torch.tensor([[math.log(0.2 / 0.8), math.log(0.3 / 0.7)]], dtype=torch.float64)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        # A certain class stays finite and large; shape (..., C + 1) -> (..., C).
        sure = softmax_to_sigmoid_logits(torch.tensor([[60.0, 0.0, 0.0]]))
        self.assertTrue(torch.isfinite(sure).all() and sure[0, 0] > 20)

    def test_convert_dispatch_and_errors(self):
        z = torch.randn(2, 3, 4)
        self.assertIs(convert_class_logits(z, True, True), z)
        self.assertIs(convert_class_logits(z, False, False), z)
        self.assertEqual(convert_class_logits(z, False, True).shape, (2, 3, 5))
        self.assertEqual(convert_class_logits(z, True, False).shape, (2, 3, 3))
        with self.assertRaisesRegex(ValueError, "MODEL.KD.BOXES.BACKGROUND"):
            sigmoid_to_softmax_logits(z, "mean")


class TestFixedCount(unittest.TestCase):
    def test_truncates_repeats_and_fills(self):
        a = torch.arange(12.0).view(3, 4)
        out = fixed_count_boxes([a, a[:2], a[:0]], 5)
        self.assertEqual(out.shape, (3, 5, 4))
        torch.testing.assert_close(out[0, :3], a)
        torch.testing.assert_close(out[1], a[[0, 1, 0, 1, 0]])
        torch.testing.assert_close(out[2], torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(5, 1))
        torch.testing.assert_close(fixed_count_boxes([a], 2)[0], a[:2])


class TestRCNNBoxEvaluation(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_rcnn()
        cls.evaluator = build_box_evaluator(cls.model)
        cls.batch = synthetic_batch(2, size=64)

    def test_registry_resolves_by_mro(self):
        self.assertIsInstance(self.evaluator, RCNNBoxEvaluator)
        self.assertEqual(BOX_EVALUATOR_REGISTRY.names()[:2], ["DETR", "GeneralizedRCNN"])
        self.assertTrue(self.evaluator.softmax)
        self.assertEqual(self.evaluator.num_classes, 4)

    def _roi_heads_path(self, images, features, boxes):
        """Detectron2's own path: the boxes as proposals -> pooler -> head -> predictor, with
        the predictor's predict_probs / predict_boxes."""
        heads = self.model.roi_heads
        proposals = []
        for b, (h, w) in zip(boxes, images.image_sizes):
            cx, cy, bw, bh = b.double().unbind(-1)
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            inst = Instances((h, w))
            inst.proposal_boxes = Boxes((xyxy * torch.tensor([w, h, w, h])).float())
            proposals.append(inst)
        feats = [features[f] for f in heads.box_in_features]
        pooled = heads.box_pooler(feats, [p.proposal_boxes for p in proposals])
        predictions = heads.box_predictor(heads.box_head(pooled))
        probs = heads.box_predictor.predict_probs(predictions, proposals)
        per_class = heads.box_predictor.predict_boxes(predictions, proposals)
        return probs, per_class

    def test_equals_roi_heads_on_the_boxes_as_proposals(self):
        boxes = random_boxes(2, 7)
        with torch.no_grad():
            images = self.evaluator.preprocess_image(self.batch)
            features = self.model.backbone(images.tensor)
            (out,) = self.evaluator.evaluate_boxes(images, [boxes])
            probs, per_class = self._roi_heads_path(images, features, boxes)
        self.assertEqual(out["pred_logits"].shape, (1, 2, 7, 5))
        self.assertEqual(out["pred_boxes"].shape, (1, 2, 7, 4))
        for b, (h, w) in enumerate(images.image_sizes):
            prob = out["pred_logits"][0, b].softmax(-1)
            torch.testing.assert_close(prob, probs[b], rtol=1e-5, atol=1e-6)
            best = probs[b][:, :-1].argmax(-1)
            expected = per_class[b].view(7, 4, 4)[torch.arange(7), best]  # class-specific
            cx, cy, bw, bh = out["pred_boxes"][0, b].unbind(-1)
            got = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            scale = torch.tensor([w, h, w, h])
            torch.testing.assert_close(got * scale, expected, rtol=1e-4, atol=1e-3)
        self.assertGreater((out["pred_boxes"][0] - boxes).abs().max(), 1e-4)  # deltas applied

    def test_groups_are_evaluated_independently_and_shared_boxes_broadcast(self):
        a, b = random_boxes(2, 3, seed=1), random_boxes(1, 5, seed=2)
        with torch.no_grad():
            images = self.evaluator.preprocess_image(self.batch)
            joint = self.evaluator.evaluate_boxes(images, [a, b])
            alone = self.evaluator.evaluate_boxes(images, [b.expand(2, -1, -1)])
        self.assertEqual(joint[0]["pred_logits"].shape, (1, 2, 3, 5))
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(joint[1][key], alone[0][key], rtol=1e-5, atol=1e-5)

    def test_class_agnostic_regression(self):
        model = tiny_rcnn("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True")
        evaluator = build_box_evaluator(model)
        boxes = random_boxes(2, 4)
        with torch.no_grad():
            images = evaluator.preprocess_image(self.batch)
            (out,) = evaluator.evaluate_boxes(images, [boxes])
            heads = model.roi_heads
            feats = model.backbone(images.tensor)
            self.model, saved = model, self.model
            try:
                _, per_class = self._roi_heads_path(images, feats, boxes)
            finally:
                self.model = saved
        self.assertEqual(per_class[0].shape, (4, 4))
        (h, w) = images.image_sizes[0]
        cx, cy, bw, bh = out["pred_boxes"][0, 0].unbind(-1)
        got = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        scale = torch.tensor([w, h, w, h])
        torch.testing.assert_close(got * scale, per_class[0], rtol=1e-4, atol=1e-3)
        self.assertIsNotNone(heads)

    def test_teach_returns_proposals_and_their_evaluation(self):
        with torch.no_grad():
            images = self.evaluator.preprocess_image(self.batch)
            own, groups = self.evaluator.teach(images, [random_boxes(1, 3)], num_own=6)
            (again,) = self.evaluator.evaluate_boxes(images, [own["boxes"]])
        self.assertEqual(own["boxes"].shape, (2, 6, 4))
        self.assertEqual(groups[0]["pred_logits"].shape, (1, 2, 3, 5))
        torch.testing.assert_close(own["pred_logits"], again["pred_logits"], rtol=1e-5, atol=1e-5)


class TestDETRBoxEvaluation(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_dab_detr()
        cls.evaluator = build_box_evaluator(cls.model)
        cls.batch = synthetic_batch(2, size=64)

    def test_equals_forward_raw_with_the_same_query_group(self):
        self.assertIsInstance(self.evaluator, DETRBoxEvaluator)
        self.assertFalse(self.evaluator.softmax)
        a, b = random_boxes(1, 4, seed=3), random_boxes(2, 5, seed=4)
        with torch.no_grad():
            images = self.evaluator.preprocess_image(self.batch)
            out = self.evaluator.evaluate_boxes(images, [a, b])
            raw = self.model.forward_raw(images, [{"boxes": b}])
        layers = raw["layers"]["pred_logits"].shape[0]
        self.assertEqual(layers, 2)  # the tiny config's DEC_LAYERS
        self.assertEqual(out[0]["pred_logits"].shape, (layers, 2, 4, 4))
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(out[1][key], raw["groups"][0][key], rtol=1e-5, atol=1e-5)

    def test_teach_own_boxes_are_the_final_predictions(self):
        with torch.no_grad():
            images = self.evaluator.preprocess_image(self.batch)
            own, _ = self.evaluator.teach(images, [], num_own=0)
            top, _ = self.evaluator.teach(images, [], num_own=2)
            raw = self.model.forward_raw(images)
        torch.testing.assert_close(own["boxes"], raw["pred_boxes"])
        torch.testing.assert_close(own["pred_logits"], raw["layers"]["pred_logits"])
        best = raw["pred_logits"].sigmoid().amax(-1).topk(2, dim=1).indices
        for i in range(2):
            torch.testing.assert_close(top["boxes"][i], raw["pred_boxes"][i, best[i]])

    def test_models_that_cannot_evaluate_boxes(self):
        torch.manual_seed(0)
        detr = build_model(
            config_from(
                os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml"),
                "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
            )
        )  # fmt: skip
        with self.assertRaisesRegex(ValueError, "student DETR cannot evaluate boxes.*box queries"):
            build_box_evaluator(detr, "student")
        with self.assertRaisesRegex(TypeError, r"teacher \(Linear\).*no box evaluator"):
            build_box_evaluator(torch.nn.Linear(1, 1), "teacher")


if __name__ == "__main__":
    unittest.main()
