# Copyright (c) kd_detr contributors.
"""ONNX export of every DETR-family meta-architecture: ONNX Runtime equals eager PyTorch on real
coco128 images (batch 1 and 3 through one dynamic-batch graph), and the errors name their fix."""
import os
import shutil
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch

from kd_detr.export import (
    ExportError,
    build_export_adapter,
    build_runner,
    check_onnx_file,
    compare_on_images,
    export_model,
    read_export_metadata,
    require_package,
)
from kd_detr.ov import set_detr_vocabulary
from tests.common import require_module
from tests.export_helpers import IMAGE_SIZE, TOLERANCE, coco128_images, roundtrip, tiny_model
from tests.model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

TWO_STAGE_REFINE = (
    "MODEL.DETR.DEFORMABLE.TWO_STAGE", "True", "MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True",
)  # fmt: skip


class _TempCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kd_export_")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


class TestOnnxEqualsEager(_TempCase):
    def check(self, config_name, *opts):
        cfg, model = tiny_model(config_name, *opts)
        diffs = roundtrip(self, cfg, model, "onnx", self.tmp)
        check_onnx_file(os.path.join(self.tmp, "model.onnx"))
        return diffs

    def test_detr(self):
        self.check("detr_tiny_parity.yaml")

    def test_dab_detr(self):
        self.check("dab_detr_tiny_parity.yaml")

    def test_dn_dab_detr(self):  # denoising queries are training-only: not in the graph
        self.check("dab_detr_tiny_parity.yaml", "MODEL.DETR.DN.ENABLED", "True")

    def test_deformable_detr(self):
        self.check("deformable_detr_tiny_parity.yaml")

    def test_deformable_detr_two_stage_box_refine(self):
        self.check("deformable_detr_tiny_parity.yaml", *TWO_STAGE_REFINE)

    def test_dino(self):
        self.check("dino_tiny.yaml")

    def test_rt_detr(self):
        self.check("rt_detr_tiny_parity.yaml")

    def test_rt_detr_v2(self):
        self.check("rt_detr_tiny_parity.yaml", "MODEL.RTDETR.VERSION", "2")

    def test_d_fine(self):
        self.check("dfine_tiny_parity.yaml")

    def test_metadata_describes_the_graph(self):
        cfg, model = tiny_model("detr_tiny_parity.yaml")
        path = export_model(cfg, model, "onnx", self.tmp, IMAGE_SIZE, opset=16)
        meta = read_export_metadata(path)
        self.assertEqual(meta["image_size"], list(IMAGE_SIZE))
        self.assertEqual(meta["opset"], 16)
        self.assertEqual(meta["input_format"], "RGB")
        self.assertEqual(meta["meta_architecture"], "DETR")
        self.assertEqual(len(meta["class_names"]), 5)
        onnx = require_module("onnx")
        graph = onnx.load(path).graph
        self.assertEqual([i.name for i in graph.input], ["images", "orig_target_sizes"])
        self.assertEqual([o.name for o in graph.output], ["labels", "boxes", "scores"])
        self.assertEqual(graph.input[0].type.tensor_type.shape.dim[0].dim_param, "N")

    def test_static_batch_graph_takes_one_image(self):
        cfg, model = tiny_model("deformable_detr_tiny_parity.yaml")
        path = export_model(cfg, model, "onnx", self.tmp, IMAGE_SIZE, dynamic_batch=False)
        onnx = require_module("onnx")
        self.assertEqual(onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value, 1)
        self.assertFalse(read_export_metadata(path)["dynamic_batch"])
        diff = compare_on_images(
            model, build_runner(path), coco128_images(1), IMAGE_SIZE, cfg.INPUT.FORMAT
        )
        self.assertEqual((diff["detections"], diff["label_mismatches"]), (10, 0), diff)
        self.assertLessEqual(max(diff["score"], diff["box"]), TOLERANCE, diff)


class TestOpenVocabularyHead(_TempCase):
    """The DETR open-vocabulary head exports with its vocabulary fixed at export time."""

    DIM = 16

    def ov_model(self, config_name, background, num_train=5):
        gen = torch.Generator().manual_seed(1)
        paths = []
        for name, num in (("train", num_train), ("test", 7)):
            paths.append(os.path.join(self.tmp, f"{name}.npy"))
            np.save(paths[-1], (torch.randn(num, self.DIM, generator=gen) * 2).numpy())
        return tiny_model(
            config_name,
            "MODEL.DETR.NUM_CLASSES", str(num_train), "DATASETS.TRAIN", "()",
            "DATASETS.TEST", "()", "MODEL.DETR.CLASS_HEAD", "region_text",
            "MODEL.OV.EMBED_DIM", str(self.DIM), "MODEL.OV.TEXT_EMBEDDINGS", paths[0],
            "MODEL.OV.TEST_TEXT_EMBEDDINGS", paths[1], "MODEL.OV.TEMPERATURE", "0.02",
            "MODEL.OV.BACKGROUND", background,
        )  # fmt: skip

    def test_dab_detr_focal_head_with_a_vocabulary_set_before_export(self):
        cfg, model = self.ov_model("dab_detr_tiny_parity.yaml", "none")
        vocabulary = torch.randn(3, self.DIM, generator=torch.Generator().manual_seed(7))
        set_detr_vocabulary(model, vocabulary, "test")
        roundtrip(self, cfg, model, "onnx", os.path.join(self.tmp, "out"))
        runner = build_runner(os.path.join(self.tmp, "out", "model.onnx"))
        images = np.random.RandomState(0).uniform(0, 255, (2, 3) + IMAGE_SIZE).astype(np.float32)
        labels, _, _ = runner(images, np.array([[200, 150]] * 2))
        self.assertLess(int(labels.max()), 3)  # the exported vocabulary has 3 classes

    def test_detr_softmax_head_with_the_test_vocabulary(self):
        cfg, model = self.ov_model("detr_tiny_parity.yaml", "zero")
        roundtrip(self, cfg, model, "onnx", self.tmp, batches=(3,))


class TestExportErrors(_TempCase):
    """One line each, naming the fix."""

    def assert_one_line(self, error, *fragments):
        message = str(error.exception)
        self.assertNotIn("\n", message)
        self.assertIn("Fix:", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_meta_architecture_without_export_support(self):
        cfg, model = tiny_model("detr_tiny_parity.yaml")
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        with self.assertRaises(ExportError) as error:
            build_export_adapter(cfg, model)
        self.assert_one_line(error, "GeneralizedRCNN", "register_export_adapter")

    def test_opset_too_low_for_grid_sample(self):
        cfg, model = tiny_model("deformable_detr_tiny_parity.yaml")
        with self.assertRaises(ExportError) as error:
            export_model(cfg, model, "onnx", self.tmp, IMAGE_SIZE, opset=15)
        self.assert_one_line(error, "GridSample", "--opset 16")

    def test_missing_runtime_package(self):
        with mock.patch.dict(sys.modules, {"onnxruntime": None}):
            with self.assertRaises(ExportError) as error:
                build_runner(os.path.join(self.tmp, "model.onnx"))
        self.assert_one_line(error, "onnxruntime", "pip install onnxruntime")
        with self.assertRaises(ExportError) as error:
            require_package("kd_detr_no_such_runtime", "no-such-runtime")
        self.assert_one_line(error, "pip install no-such-runtime")


if __name__ == "__main__":
    unittest.main()
