# Copyright (c) kd_detr contributors.
"""Class targets a set predictor can follow (``kd_detr.distill.set_targets``,
``MODEL.KD.BOXES.{MIN_CLASS_PROBABILITY, CLASS_NMS_THRESH}``): the floor and the class-wise NMS
against float64 / pure-Python references, their place in the box-evaluation pairing of a Faster
R-CNN teacher and a DAB-DETR student, and the start-up errors."""
import os
import tempfile
import unittest

import torch

from detectron2.utils.events import EventStorage

from kd_detr.config import load_config
from kd_detr.distill import BoxEvaluationPairing, Teacher
from kd_detr.distill.set_targets import (
    floor_class_probabilities,
    probability_logit,
    suppress_duplicate_targets,
)

from .kd_helpers import FixedBatchKDTrainer, synthetic_batch
from .model_helpers import single_thread_module
from .test_box_evaluation import random_boxes, tiny_dab_detr, tiny_rcnn
from .test_kd_rcnn import detr_student_cfg

setUpModule, tearDownModule = single_thread_module()


def _iou(a, b):
    """IoU of two xyxy boxes (python floats)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def _xyxy(boxes):
    return [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for cx, cy, w, h in boxes]


def reference_suppressed(probs, boxes, iou_threshold, score_threshold, point_boxes=None):
    """Greedy class-wise NMS by hand: the set of suppressed (point, class) of one image.

    probs: list[list[float]] (M, C); boxes, point_boxes: lists of cxcywh (M, 4); with
    point_boxes the rank is p * IoU(point box, box)."""
    xyxy = _xyxy(boxes)
    fit = [1.0] * len(boxes)
    if point_boxes is not None:
        fit = [_iou(a, b) for a, b in zip(_xyxy(point_boxes), xyxy)]
    suppressed = set()
    for c in range(len(probs[0])):
        order = sorted(
            (m for m in range(len(probs)) if probs[m][c] > score_threshold),
            key=lambda m: -probs[m][c] * fit[m],
        )
        kept = []
        for m in order:
            if any(_iou(xyxy[m], xyxy[k]) > iou_threshold for k in kept):
                suppressed.add((m, c))
            else:
                kept.append(m)
    return suppressed


class TestFloor(unittest.TestCase):
    def test_probabilities_raised_to_the_floor_only(self):
        logits = torch.randn(2, 7, 5, dtype=torch.float64) * 6
        out = floor_class_probabilities(logits, 0.01)
        expected = logits.sigmoid().clamp(min=0.01)
        torch.testing.assert_close(out.sigmoid(), expected, rtol=0, atol=1e-12)
        above = logits.sigmoid() > 0.01
        self.assertTrue(torch.equal(out[above], logits[above]))
        self.assertIs(floor_class_probabilities(logits, 0.0), logits)

    def test_probability_logit(self):
        self.assertAlmostEqual(probability_logit(0.01), -4.59511985013459, places=12)
        for bad in (0.0, 1.0, -0.1, 1.5):
            with self.assertRaisesRegex(ValueError, "strictly between 0 and 1"):
                probability_logit(bad)


class TestClassNMS(unittest.TestCase):
    def test_against_a_hand_written_greedy_nms(self):
        for ranked_by_fit in (False, True):
            with self.subTest(ranked_by_fit=ranked_by_fit):
                self._check_against_reference(ranked_by_fit)

    def _check_against_reference(self, ranked_by_fit):
        gen = torch.Generator().manual_seed(3)
        batch, num, classes = 2, 40, 3
        # Clustered boxes so that many pairs overlap above the threshold.
        centres = torch.rand(batch, 4, 2, generator=gen) * 0.6 + 0.2
        pick = torch.randint(0, 4, (batch, num), generator=gen)
        jitter = (torch.rand(batch, num, 2, generator=gen) - 0.5) * 0.08
        sizes = torch.rand(batch, num, 2, generator=gen) * 0.1 + 0.15
        centre = centres.gather(1, pick[..., None].expand(-1, -1, 2)) + jitter
        boxes = torch.cat([centre, sizes], -1)
        logits = torch.randn(batch, num, classes, generator=gen) * 3
        # The points the teacher refined into ``boxes``: shifted by up to a third of the size.
        shift = (torch.rand(batch, num, 2, generator=gen) - 0.5) * 0.66 * sizes
        points = torch.cat([boxes[..., :2] + shift, sizes], -1) if ranked_by_fit else None
        floor = 0.01
        out = suppress_duplicate_targets(
            logits, boxes, 0.5, floor, score_threshold=floor, point_boxes=points
        )
        floor_logit = probability_logit(floor)
        total = 0
        for b in range(batch):
            probs = logits[b].double().sigmoid().tolist()
            point_list = None if points is None else points[b].double().tolist()
            expected = reference_suppressed(
                probs, boxes[b].double().tolist(), 0.5, floor, point_list
            )
            total += len(expected)
            for m in range(num):
                for c in range(classes):
                    want = floor_logit if (m, c) in expected else float(logits[b, m, c])
                    self.assertAlmostEqual(float(out[b, m, c]), want, places=5, msg=(b, m, c))
        self.assertGreater(total, 10)  # the case suppresses something
        self.assertEqual(out.dtype, logits.dtype)

    def test_the_rank_decides_which_duplicate_is_kept(self):
        boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2]]])  # IoU ~0.9
        logits = torch.tensor([[[5.0], [4.0]]])  # point 0 the more probable
        points = torch.tensor([[[0.6, 0.6, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2]]])  # point 1 fits
        floor = torch.tensor(probability_logit(0.01)).item()  # in float32
        by_p = suppress_duplicate_targets(logits, boxes, 0.5, 0.01)
        by_fit = suppress_duplicate_targets(logits, boxes, 0.5, 0.01, point_boxes=points)
        self.assertEqual(by_p.flatten().tolist(), [5.0, floor])
        self.assertEqual(by_fit.flatten().tolist(), [floor, 4.0])

    def test_separate_boxes_keep_their_targets(self):
        boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]]])
        logits = torch.tensor([[[3.0, -2.0], [2.0, 1.0]]])
        self.assertTrue(torch.equal(suppress_duplicate_targets(logits, boxes, 0.5, 0.01), logits))

    def test_threshold_range(self):
        with self.assertRaisesRegex(ValueError, r"must be in \(0, 1\)"):
            suppress_duplicate_targets(torch.zeros(1, 2, 2), random_boxes(1, 2), 1.0, 0.01)


class TestPairing(unittest.TestCase):
    """Faster R-CNN teacher -> DAB-DETR student at boxes: the options change the class targets
    exactly as the functions do and nothing else."""

    @classmethod
    def setUpClass(cls):
        cls.teacher_model = tiny_rcnn(seed=1)
        torch.manual_seed(2)
        with torch.no_grad():  # class probabilities that differ between points and classes
            cls.teacher_model.roi_heads.box_predictor.cls_score.weight.normal_(std=2.0)
            cls.teacher_model.roi_heads.box_predictor.cls_score.bias.normal_(std=2.0)
        cls.data = synthetic_batch(2)

    def _context(self, **options):
        student = tiny_dab_detr(seed=0).train()
        pairing = BoxEvaluationPairing(
            student=student, teacher=Teacher(self.teacher_model, None), num_teacher_boxes=6,
            **options,
        )  # fmt: skip
        torch.manual_seed(0)
        with EventStorage(0):
            return pairing.run(student, self.data, 0)[1]

    def test_targets_with_floor_and_class_nms(self):
        plain = self._context().pairs[0]
        shaped = self._context(min_class_probability=0.05, class_nms_thresh=0.3).pairs[0]
        expected = suppress_duplicate_targets(
            plain.teacher["pred_logits"], plain.teacher["pred_boxes"], 0.3, 0.05, 0.05
        )
        expected = floor_class_probabilities(expected, 0.05)
        torch.testing.assert_close(shaped.teacher["pred_logits"], expected)
        floored = floor_class_probabilities(plain.teacher["pred_logits"], 0.05)
        self.assertFalse(torch.equal(floored, plain.teacher["pred_logits"]))  # the floor acts
        self.assertFalse(torch.equal(expected, floored))  # and so does the NMS
        torch.testing.assert_close(shaped.teacher["pred_boxes"], plain.teacher["pred_boxes"])
        torch.testing.assert_close(shaped.weights, plain.weights)  # foreground weights unchanged
        context = self._context(min_class_probability=0.05, class_nms_thresh=0.3,
                                class_nms_rank="probability_x_fit")  # fmt: skip
        by_fit = context.pairs[0]
        expected = suppress_duplicate_targets(
            plain.teacher["pred_logits"], plain.teacher["pred_boxes"], 0.3, 0.05, 0.05,
            point_boxes=context.teacher_outputs["own"]["boxes"],
        )  # fmt: skip
        expected = floor_class_probabilities(expected, 0.05)
        torch.testing.assert_close(by_fit.teacher["pred_logits"], expected)

    def _pairing(self, student, teacher, **options):
        return BoxEvaluationPairing(student=student, teacher=Teacher(teacher, None), **options)

    def test_startup_errors(self):
        detr = tiny_dab_detr()
        with self.assertRaisesRegex(ValueError, "targets of a sigmoid .*softmax classes"):
            self._pairing(tiny_rcnn(), detr, min_class_probability=0.01)
        with self.assertRaisesRegex(ValueError, "MIN_CLASS_PROBABILITY.*strictly between"):
            self._pairing(detr, self.teacher_model, min_class_probability=1.0)
        with self.assertRaisesRegex(ValueError, r"CLASS_NMS_THRESH must be in \(0, 1\)"):
            self._pairing(detr, self.teacher_model, min_class_probability=0.01,
                          class_nms_thresh=1.5)  # fmt: skip
        with self.assertRaisesRegex(ValueError, "MIN_CLASS_PROBABILITY, which is 0"):
            self._pairing(detr, self.teacher_model, class_nms_thresh=0.5)
        with self.assertRaisesRegex(ValueError, "CLASS_NMS_RANK must be one of"):
            self._pairing(detr, self.teacher_model, class_nms_rank="fit")


class TestFromConfig(unittest.TestCase):
    def test_keys_reach_the_pairing_of_the_kd_trainer(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rcnn.pth")
            torch.save({"model": tiny_rcnn(seed=1).state_dict()}, path)
            cfg = detr_student_cfg(
                os.path.join(tmp, "out"), path, "MODEL.KD.BOXES.MIN_CLASS_PROBABILITY", "0.01",
                "MODEL.KD.BOXES.CLASS_NMS_THRESH", "0.5",
            )  # fmt: skip
            pairing = FixedBatchKDTrainer(cfg).pairing
        self.assertEqual((pairing.min_class_probability, pairing.class_nms_thresh), (0.01, 0.5))
        defaults = load_config(register_datasets=False).MODEL.KD.BOXES
        self.assertEqual((defaults.MIN_CLASS_PROBABILITY, defaults.CLASS_NMS_THRESH), (0.0, 0.0))


if __name__ == "__main__":
    unittest.main()
