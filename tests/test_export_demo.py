# Copyright (c) kd_detr contributors.
"""tools/demo.py: eager (config + MODEL.WEIGHTS) and exported (--onnx) models draw the same
number of detections on real images; a video through the exported model."""
import os
import shutil
import sys
import tempfile
import unittest

import numpy as np

from detectron2.checkpoint import DetectionCheckpointer

from kd_detr.export import export_model
from tests.common import REPO_ROOT, require_module
from tests.export_helpers import coco128_images, tiny_model
from tests.model_helpers import single_thread_module

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import demo  # noqa: E402  (tools/ is not a package)

setUpModule, tearDownModule = single_thread_module()

DETR_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")
# The eager demo resizes with ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST); a square export
# of the same size sees the same pixels only for square inputs, so both use square crops here.
SIDE = 128


class TestDemo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_module("onnxruntime")
        cls.tmp = tempfile.mkdtemp(prefix="kd_export_demo_")
        opts = ("INPUT.MIN_SIZE_TEST", str(SIDE), "INPUT.MAX_SIZE_TEST", str(SIDE))
        cls.opts = list(opts)
        cfg, model = tiny_model("detr_tiny_parity.yaml", *opts)
        DetectionCheckpointer(model, save_dir=cls.tmp).save("detr")
        cls.weights = os.path.join(cls.tmp, "detr.pth")
        cls.onnx = export_model(cfg, model, "onnx", os.path.join(cls.tmp, "onnx"), (SIDE, SIDE))
        from PIL import Image

        cls.images = []
        for i, path in enumerate(coco128_images(2)):
            image = Image.open(path).convert("RGB")
            side = min(image.size)
            cls.images.append(os.path.join(cls.tmp, f"square_{i}.jpg"))
            image.crop((0, 0, side, side)).save(cls.images[-1], quality=95)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_eager_and_onnx_draw_the_same_detections(self):
        common = ["--input", os.path.join(self.tmp, "square_*.jpg"), "--confidence-threshold"]
        eager = demo.main(
            ["--config-file", DETR_CONFIG, "--output", os.path.join(self.tmp, "eager")]
            + common + ["0.2", "--opts", "MODEL.WEIGHTS", self.weights] + self.opts
        )
        exported = demo.main(
            ["--onnx", self.onnx, "--output", os.path.join(self.tmp, "exported")]
            + common + ["0.2"]
        )
        self.assertEqual(len(eager), 2)
        self.assertEqual([r["detections"] for r in eager], [r["detections"] for r in exported])
        self.assertGreater(sum(r["detections"] for r in eager), 0)
        for r in eager + exported:
            self.assertTrue(os.path.exists(r["output"]))

    def test_video_through_the_exported_model(self):
        cv2 = require_module("cv2")
        path = os.path.join(self.tmp, "clip.avi")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 5, (160, 120))
        for i in range(3):
            writer.write(np.full((120, 160, 3), 40 * i, dtype=np.uint8))
        writer.release()
        out = demo.main(
            ["--onnx", self.onnx, "--video-input", path, "--output", os.path.join(self.tmp, "v")]
        )
        self.assertEqual(out[0]["frames"], 3)
        self.assertTrue(os.path.getsize(out[0]["output"]) > 0)


if __name__ == "__main__":
    unittest.main()
