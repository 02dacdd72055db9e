# Copyright (c) kd_detr contributors.
"""TorchScript export (traced adapter): equal to eager PyTorch on real coco128 images, batch 1
and 3 through one traced module; OpenVINO on the ONNX graph when it is installed."""
import shutil
import tempfile
import unittest

from tests.common import require_module
from tests.export_helpers import roundtrip, tiny_model
from tests.model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


class TestTorchScriptEqualsEager(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kd_export_ts_")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_dab_detr(self):
        cfg, model = tiny_model("dab_detr_tiny_parity.yaml")
        roundtrip(self, cfg, model, "torchscript", self.tmp)

    def test_dino(self):
        cfg, model = tiny_model("dino_tiny.yaml")
        roundtrip(self, cfg, model, "torchscript", self.tmp)


class TestOpenVINOEqualsEager(unittest.TestCase):
    """OpenVINO (optional runtime, in the test extra) on the ONNX graph, f32 precision."""

    def setUp(self):
        require_module("openvino")
        self.tmp = tempfile.mkdtemp(prefix="kd_export_ov_")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_deformable_detr(self):
        cfg, model = tiny_model("deformable_detr_tiny_parity.yaml")
        roundtrip(self, cfg, model, "onnx", self.tmp, runtime="openvino")


if __name__ == "__main__":
    unittest.main()
