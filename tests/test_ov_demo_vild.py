# Copyright (c) kd_detr contributors.
"""tools/ov_demo.py with a ViLD Faster R-CNN (configs/ov/vild_efflite0_fpn_coco128_ovd.yaml,
random weights in a temp checkpoint) and Detic's real COCO CLIP text embeddings."""
import os
import shutil
import tempfile
import unittest
import uuid

import numpy as np
import torch
from PIL import Image

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model

from kd_detr.config import load_config
from kd_detr.ov.text_embeddings import load_text_embeddings
from tests.common import REPO_ROOT, shared_data
from tests.test_ov_demo import _load_demo, save_checkpoint_and_image

CONFIG = os.path.join(REPO_ROOT, "configs", "ov", "vild_efflite0_fpn_coco128_ovd.yaml")
# small test images, no ImageNet weights (the checkpoint holds every weight)
OPTS = ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160"]  # fmt: skip


class TestViLDDemo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.text = shared_data("clip_text", "coco_clip_a+cname.npy")
        cls.tmp = tempfile.mkdtemp(prefix="kd_ov_demo_vild_")
        train = os.path.join(cls.tmp, "train.npy")
        np.save(train, np.random.RandomState(0).randn(48, 512).astype(np.float32))
        cfg = load_config(CONFIG, freeze=False, register_datasets=False)
        cfg.merge_from_list(
            OPTS + ["MODEL.OV.TEXT_EMBEDDINGS", train, "MODEL.OV.VILD.VOCABULARY_FROM_DATASETS",
                    "False", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
        )  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg)
        cls.weights, cls.image = save_checkpoint_and_image(cls.tmp, model, "tiny_vild")
        cls.demo = _load_demo()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _args(self, *extra, config=CONFIG):
        out = os.path.join(self.tmp, f"out_{uuid.uuid4().hex[:6]}")
        args = ["--config-file", config, "--weights", self.weights, "--input", self.image,
                "--output", out, "--text-embeddings", self.text]  # fmt: skip
        return args + list(extra) + ["--opts"] + OPTS

    def test_custom_vocabulary_on_the_box_predictor(self):
        names = ["umbrella", "cat", "dog"]
        args = self.demo.parse_args(self._args("--vocabulary", ",".join(names)))
        _, emb = self.demo.resolve_vocabulary(args)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "vocabulary.npy")
            np.save(path, emb.numpy())
            cfg = self.demo.setup_cfg(args, path, len(names))
            model = build_model(cfg).eval()
        self.assertEqual(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, 0.3)
        # the classifier's vocabulary is the Detic rows of the names, in the given order
        rows = load_text_embeddings(self.text, expected_num=80)
        coco_names = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
        expected = rows[[coco_names.index(n) for n in names]]
        predictor = model.roi_heads.box_predictor
        torch.testing.assert_close(predictor.cls_score.vocabulary, expected)
        self.assertEqual(predictor.num_classes, 3)

    def test_image_and_classes(self):
        results = self.demo.main(self._args("--vocabulary", "cat,dog,umbrella",
                                            "--confidence-threshold", "0.0"))  # fmt: skip
        self.assertEqual(len(results), 1)
        with Image.open(results[0]["output"]) as drawn:
            self.assertEqual(drawn.size, (150, 120))  # (width, height) of the input
        classes = results[0]["instances"].pred_classes
        self.assertGreater(len(classes), 0)
        self.assertLessEqual(len(classes), 100)  # TEST.DETECTIONS_PER_IMAGE
        self.assertTrue(bool(((classes >= 0) & (classes < 3)).all()))
        # all 80 rows of the file (names from the COCO order), scores above the threshold
        results = self.demo.main(self._args("--confidence-threshold", "0.02"))
        instances = results[0]["instances"]
        self.assertTrue(bool((instances.scores >= 0.02).all()))
        self.assertTrue(bool(((instances.pred_classes >= 0) & (instances.pred_classes < 80)).all()))

    def test_not_an_open_vocabulary_config(self):
        plain = os.path.join(REPO_ROOT, "configs", "Base-EfficientNetLite.yaml")
        with self.assertRaisesRegex(ValueError, "not an open-vocabulary model.*ViLDROIHeads"):
            self.demo.main(self._args("--vocabulary", "cat", config=plain))


if __name__ == "__main__":
    unittest.main()
