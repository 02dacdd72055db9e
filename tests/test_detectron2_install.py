# Copyright (c) kd_detr contributors.
"""The Python-only detectron2 install: the ``_C`` stand-in and its clear errors."""
import importlib.metadata
import unittest

import numpy as np
import torch

from detectron2 import _C

STANDIN = getattr(_C, "KD_DETR_STANDIN", False)


@unittest.skipUnless(STANDIN, "detectron2 is built from source here: its _C is real")
class TestStandin(unittest.TestCase):
    def assert_missing(self, op_name, fn):
        with self.assertRaises(RuntimeError) as ctx:
            fn()
        message = str(ctx.exception)
        self.assertIn(op_name, message)
        self.assertIn("Build detectron2 from source", message)

    def test_layers_import_and_version(self):
        import detectron2.layers  # noqa: F401  (fails without a _C module)

        self.assertEqual(detectron2.__version__, "0.6")  # the pinned sdist
        self.assertEqual(importlib.metadata.version("detectron2"), "0.6")

    def test_deformable_conv(self):
        from detectron2.layers import DeformConv

        # On CPU, v0.6 runs DeformConv through torchvision; its CUDA path calls _C.
        conv = DeformConv(4, 4, kernel_size=3, padding=1, bias=False)
        x = torch.rand(1, 4, 8, 8)
        out = conv(x, torch.zeros(1, 18, 8, 8))
        ref = torch.nn.functional.conv2d(x, conv.weight, padding=1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        self.assert_missing("deform_conv_forward", lambda: _C.deform_conv_forward(x))
        self.assert_missing(
            "modulated_deform_conv_forward", lambda: _C.modulated_deform_conv_forward(x)
        )

    def test_rotated_boxes(self):
        from detectron2.layers.rotated_boxes import pairwise_iou_rotated

        boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
        self.assert_missing("box_iou_rotated", lambda: pairwise_iou_rotated(boxes, boxes))

    def test_nms_rotated(self):
        from detectron2.layers import nms_rotated

        boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0], [5.0, 5.0, 4.0, 4.0, 10.0]])
        self.assert_missing("nms_rotated", lambda: nms_rotated(boxes, torch.rand(2), 0.5))

    def test_roi_align_rotated(self):
        from detectron2.layers import ROIAlignRotated

        pooler = ROIAlignRotated((2, 2), spatial_scale=1.0, sampling_ratio=0)
        rois = torch.tensor([[0.0, 4.0, 4.0, 4.0, 4.0, 0.0]])
        features = torch.rand(1, 1, 8, 8)
        self.assert_missing("roi_align_rotated_forward", lambda: pooler(features, rois))

    def test_cocoeval_opt(self):
        from pycocotools.coco import COCO

        from detectron2.evaluation.fast_eval_api import COCOeval_opt

        gt = COCO()
        gt.dataset = {
            "images": [{"id": 1, "width": 10, "height": 10}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16,
                 "iscrowd": 0}
            ],
            "categories": [{"id": 1, "name": "a"}],
        }
        gt.createIndex()
        dt = gt.loadRes(np.array([[1, 1, 1, 4, 4, 0.9, 1]]))
        evaluator = COCOeval_opt(gt, dt, "bbox")
        self.assert_missing("InstanceAnnotation", evaluator.evaluate)

    def test_env_info_names_the_standin(self):
        from detectron2.utils.collect_env import collect_env_info

        self.assertIn("kd_detr stand-in", collect_env_info())


if __name__ == "__main__":
    unittest.main()
