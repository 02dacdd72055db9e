# Copyright (c) kd_detr contributors.
"""Every YAML under configs/ merges with add_kd_detr_config and its model builds on CPU."""
import glob
import math
import os
import unittest

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import kd_detr  # noqa: F401  (registers models)
from kd_detr import add_kd_detr_config
from tests.common import REPO_ROOT

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True))


def load_config(path):
    cfg = get_cfg()
    add_kd_detr_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


class TestConfigs(unittest.TestCase):
    def test_configs_found(self):
        self.assertGreater(len(CONFIGS), 5)

    def test_every_config_merges_and_every_leaf_builds(self):
        for path in CONFIGS:
            name = os.path.relpath(path, REPO_ROOT)
            with self.subTest(config=name):
                cfg = load_config(path)
                if os.path.basename(path).startswith("Base-"):
                    continue  # partial configs: merging is the test
                model = build_model(cfg)
                self.assertGreater(sum(p.numel() for p in model.parameters()), 0)
                del model

    def test_iterations_match_epoch_comments(self):
        # Recipes state MAX_ITER from epochs: check the arithmetic of COCO recipes.
        coco_images = 117266
        for path in CONFIGS:
            cfg = load_config(path)
            if cfg.DATASETS.TRAIN != ("coco_2017_train",) or "epoch" not in open(path).read():
                continue
            with self.subTest(config=os.path.relpath(path, REPO_ROOT)):
                batch = cfg.SOLVER.IMS_PER_BATCH
                epochs = round(cfg.SOLVER.MAX_ITER * batch / coco_images)
                self.assertEqual(cfg.SOLVER.MAX_ITER, math.ceil(epochs * coco_images / batch))


if __name__ == "__main__":
    unittest.main()
