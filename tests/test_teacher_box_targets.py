# Copyright (c) kd_detr contributors.
"""tools/teacher_box_targets.py: IoU against hand values, boxes drawn inside their bins, and the
per-bin means through a stand-in evaluator (an identity model and a shifting one)."""
import unittest

import numpy as np
import torch

from .common import load_tool


class _StandIn:
    """Returns the boxes it is given, moved by ``shift`` (cxcywh), with logit 0 (sigmoid)."""

    softmax = False

    def __init__(self, shift=0.0):
        self.shift = shift

    def preprocess_image(self, batched_inputs):
        return None

    def evaluate_boxes(self, images, groups, state=None):
        boxes = groups[0] + torch.tensor([self.shift, 0.0, 0.0, 0.0])
        return [{"pred_boxes": boxes[None], "pred_logits": torch.zeros(1, *boxes.shape[:2], 3)}]


class TestTeacherBoxTargets(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tool = load_tool("teacher_box_targets.py")
        cls.objects = [np.array([0.2, 0.2, 0.5, 0.6]), np.array([0.55, 0.1, 0.9, 0.4])]

    def test_iou_hand_values(self):
        iou = self.tool.iou_xyxy
        self.assertAlmostEqual(iou(np.array([0, 0, 2, 2.0]), np.array([1, 1, 3, 3.0])), 1 / 7)
        self.assertEqual(iou(np.array([0, 0, 1, 1.0]), np.array([2, 2, 3, 3.0])), 0.0)
        self.assertEqual(iou(self.objects[0], self.objects[0]), 1.0)

    def test_drawn_boxes_fall_in_their_bin(self):
        rng = np.random.default_rng(0)
        for low, high in self.tool.BINS:
            for _ in range(20):
                box = self.tool.box_near(self.objects[0], low, high, rng)
                self.assertTrue(low <= self.tool.iou_xyxy(box, self.objects[0]) < high)
                self.assertTrue(((box >= 0) & (box <= 1)).all())

    def test_identity_model_keeps_the_input_iou(self):
        rows = self.tool.measure(_StandIn(), [({}, self.objects)], per_object=4)
        self.assertEqual([r["boxes"] for r in rows], [8] * len(self.tool.BINS))
        for row in rows:
            low, high = row["bin"]
            self.assertAlmostEqual(row["refined_iou"], row["input_iou"], places=6)
            self.assertTrue(low <= row["input_iou"] < high)
            self.assertAlmostEqual(row["foreground"], 0.5)  # sigmoid(0)

    def test_a_model_that_moves_boxes_away_lowers_the_refined_iou(self):
        same = self.tool.measure(_StandIn(), [({}, self.objects)], seed=3)
        moved = self.tool.measure(_StandIn(shift=1.5), [({}, self.objects)], seed=3)
        for a, b in zip(same, moved):
            self.assertEqual(a["input_iou"], b["input_iou"])  # the same boxes were drawn
            self.assertEqual(b["refined_iou"], 0.0)  # shifted out of the image's objects


if __name__ == "__main__":
    unittest.main()
