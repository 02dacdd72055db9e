# Copyright (c) kd_detr contributors.
"""The coco128 open-vocabulary config end to end (train_net.py, a few iterations): COCO-OVD
splits from the config, Detic's real COCO embeddings picked per split, coco_ovd evaluation."""
import json
import os
import tempfile
import unittest
from unittest import mock

import torch

from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser

import train_net
from kd_detr.ov import COCO_OVD_NOVEL_IDS
from tests.common import REPO_ROOT, SHARED_DATA, shared_data

CONFIG = os.path.join(REPO_ROOT, "configs", "ov", "ov_dab_detr_efflite0_coco128_ovd.yaml")


class TestOVCoco128(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        shared_data("coco128", "annotations", "instances_val2017.json")
        shared_data("clip_text", "coco_clip_a+cname.npy")
        cls._tmp = tempfile.TemporaryDirectory()
        tmp = cls._tmp.name
        # a val subset: the first 10 images holding a novel-class annotation
        with open(shared_data("coco128", "annotations", "instances_val2017.json")) as f:
            val = json.load(f)
        novel_ids = set(COCO_OVD_NOVEL_IDS)
        novel = [a["image_id"] for a in val["annotations"] if a["category_id"] in novel_ids]
        keep = set(list(dict.fromkeys(novel))[:10])
        val["images"] = [im for im in val["images"] if im["id"] in keep]
        val["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
        val_json = os.path.join(tmp, "val_subset.json")
        with open(val_json, "w") as f:
            json.dump(val, f)
        shared = "$KD_DETR_SHARED_DATA/coco128"
        cls.train_name, cls.val_name = "kd_test_coco128_ovd_train", "kd_test_coco128_ovd_val"
        datasets = (
            f'["{cls.train_name},{shared}/annotations/instances_train2017.json,{shared}/train2017,'
            f'train", "{cls.val_name},{val_json},{shared}/val2017,val,65"]'
        )
        opts = [
            "OUTPUT_DIR", os.path.join(tmp, "out"),
            "DATASETS.COCO_OVD", datasets, "DATASETS.COCO_OVD_CACHE_DIR", os.path.join(tmp, "c"),
            "DATASETS.TRAIN", f"('{cls.train_name}',)", "DATASETS.TEST", f"('{cls.val_name}',)",
            "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.STEPS", "(2,)", "DATALOADER.NUM_WORKERS", "0",
        ]  # fmt: skip
        args = default_argument_parser().parse_args(["--config-file", CONFIG, *opts])
        with mock.patch.dict(os.environ, {"KD_DETR_SHARED_DATA": SHARED_DATA}):
            train_net.main(args)
        with open(os.path.join(tmp, "out", "metrics_final.json")) as f:
            cls.final = json.load(f)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_splits_and_vocabularies(self):
        train_classes = MetadataCatalog.get(self.train_name).thing_classes
        val_classes = MetadataCatalog.get(self.val_name).thing_classes
        self.assertEqual((len(train_classes), len(val_classes)), (48, 65))
        self.assertIn("umbrella", val_classes)
        self.assertNotIn("umbrella", train_classes)

    def test_reports_novel_base_all_ap50(self):
        self.assertEqual(self.final["max_iter"], 3)
        box = self.final["results"][self.val_name]["bbox"]
        for split in ("novel", "base", "all"):
            value = box[f"AP50-{split}"]
            self.assertTrue(0.0 <= value <= 100.0, (split, value))
        num = {s: int(box[f"AP50-{s}-num_classes"]) for s in ("novel", "base", "all")}
        self.assertGreater(num["novel"], 0)
        self.assertEqual(num["novel"] + num["base"], num["all"])


if __name__ == "__main__":
    unittest.main()
