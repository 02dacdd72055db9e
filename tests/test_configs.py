# Copyright (c) kd_detr contributors.
"""Every YAML under configs/ merges with add_kd_detr_config and its model builds on CPU."""
import glob
import math
import os
import tempfile
import unittest

import numpy as np

from detectron2.modeling import build_model

from kd_detr.config import load_config
from kd_detr.data import register_from_config
from kd_detr.modeling.num_classes import num_classes_key
from kd_detr.utils import expand_data_path
from tests.common import REPO_ROOT

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True))
# configs/bench holds the KD bench's arms files (tools/kd_bench.py), not Detectron2 configs.
CONFIGS = [c for c in CONFIGS if os.sep + os.path.join("configs", "bench") + os.sep not in c]


def stand_in_missing_inputs(cfg, tmp):
    """Build recipes offline: register the config's datasets when their files exist (as
    train_net.py does), and replace open-vocabulary files that are absent here (recipes name
    files under datasets/) by random text embeddings of the model's class count."""
    try:
        register_from_config(cfg)
    except FileNotFoundError:
        pass
    ov = cfg.MODEL.OV
    if ov.TEXT_EMBEDDINGS and not os.path.isfile(expand_data_path(ov.TEXT_EMBEDDINGS)):
        num = cfg
        for part in num_classes_key(cfg).split("."):
            num = num[part]
        ov.TEXT_EMBEDDINGS = os.path.join(tmp, f"stand_in_{num}x{ov.EMBED_DIM}.npy")
        np.save(ov.TEXT_EMBEDDINGS, np.random.RandomState(0).randn(num, ov.EMBED_DIM))
        ov.TEST_TEXT_EMBEDDINGS = ""
        ov.VILD.VOCABULARY_FROM_DATASETS = False
        ov.DETR_HEAD.VOCABULARY_FROM_DATASETS = False
    if ov.VILD.NOVEL_CATEGORIES and not os.path.isfile(ov.VILD.NOVEL_CATEGORIES):
        ov.VILD.NOVEL_CATEGORIES = ""


def recipe_config(path):
    """The recipe on the CPU, not frozen, datasets not registered yet (see
    :func:`stand_in_missing_inputs`)."""
    return load_config(path, ["MODEL.DEVICE", "cpu"], freeze=False, register_datasets=False)


class TestConfigs(unittest.TestCase):
    def test_configs_found(self):
        self.assertGreater(len(CONFIGS), 5)

    def test_every_config_merges_and_every_leaf_builds(self):
        for path in CONFIGS:
            name = os.path.relpath(path, REPO_ROOT)
            with self.subTest(config=name):
                cfg = recipe_config(path)
                if os.path.basename(path).startswith("Base-"):
                    continue  # partial configs: merging is the test
                with tempfile.TemporaryDirectory() as tmp:
                    stand_in_missing_inputs(cfg, tmp)
                    model = build_model(cfg)
                self.assertGreater(sum(p.numel() for p in model.parameters()), 0)
                del model

    def test_iterations_match_epoch_comments(self):
        # Recipes state MAX_ITER from epochs: check the arithmetic of COCO recipes.
        coco_images = 117266
        for path in CONFIGS:
            cfg = recipe_config(path)
            if cfg.DATASETS.TRAIN != ("coco_2017_train",) or "epoch" not in open(path).read():
                continue
            with self.subTest(config=os.path.relpath(path, REPO_ROOT)):
                batch = cfg.SOLVER.IMS_PER_BATCH
                epochs = round(cfg.SOLVER.MAX_ITER * batch / coco_images)
                self.assertEqual(cfg.SOLVER.MAX_ITER, math.ceil(epochs * coco_images / batch))

    def test_dino_recipes_schedule_and_settings(self):
        # DINO-4scale 1x: 12 epochs at batch 16, lr drop after epoch 11, 900 queries.
        coco_images, batch = 117266, 16
        names = [
            "dino/dino_R_50_4scale_12ep_coco.yaml",
            "dino/dino_R_101_4scale_12ep_coco.yaml",
            "kd_detr/kd_dino_R_50_from_R_101_12ep_coco.yaml",
            "kd_detr/kd_dino_R_18_from_R_50_12ep_coco.yaml",
        ]
        for name in names:
            with self.subTest(config=name):
                cfg = recipe_config(os.path.join(REPO_ROOT, "configs", name))
                self.assertEqual(cfg.SOLVER.IMS_PER_BATCH, batch)
                self.assertEqual(cfg.SOLVER.MAX_ITER, math.ceil(12 * coco_images / batch))
                self.assertEqual(cfg.SOLVER.STEPS, (math.ceil(11 * coco_images / batch),))
                self.assertEqual((cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER), (1e-4, 0.1))
                d = cfg.MODEL.DETR
                self.assertEqual((d.NUM_QUERIES, d.DEFORMABLE.NUM_FEATURE_LEVELS), (900, 4))
                self.assertEqual((d.DN.NUM_QUERIES, d.DN.BOX_NOISE_SCALE), (100, 1.0))
                self.assertTrue(d.DN.ENABLED and d.DN.CONTRASTIVE)


if __name__ == "__main__":
    unittest.main()
