# Copyright (c) kd_detr contributors.
"""A few optimizer steps on real BCCD images lower the DETR / DAB-DETR training loss."""
import os
import unittest

import torch

from detectron2.data import DatasetMapper
from detectron2.modeling import build_model

from kd_detr.config import load_config
from kd_detr.data import load_voc_instances
from kd_detr.engine.optimizer import build_optimizer
from tests.common import REPO_ROOT, shared_data

BCCD_CLASSES = ["RBC", "WBC", "Platelets"]


def _tiny_cfg(config_name):
    config_file = os.path.join(REPO_ROOT, "configs", "tests", config_name)
    cfg = load_config(config_file, freeze=False, register_datasets=False)
    cfg.MODEL.DETR.NUM_CLASSES = len(BCCD_CLASSES)
    cfg.MODEL.DETR.NUM_QUERIES = 40  # BCCD images hold up to ~30 cells
    cfg.INPUT.MIN_SIZE_TRAIN = (160,)
    cfg.INPUT.MAX_SIZE_TRAIN = 214
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    return cfg


class TestBCCDTraining(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        root = shared_data("bccd")
        cls.dicts = load_voc_instances(root, "train", BCCD_CLASSES)[:2]

    def _loss_curve(self, config_name, steps=12):
        torch.manual_seed(0)
        cfg = _tiny_cfg(config_name)
        model = build_model(cfg)
        model.train()
        mapper = DatasetMapper(cfg, is_train=True)
        batch = [mapper(dict(d)) for d in self.dicts]
        optimizer = build_optimizer(cfg, model)
        losses = []
        for _ in range(steps):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    def test_detr_loss_decreases(self):
        losses = self._loss_curve("detr_tiny_parity.yaml")
        self.assertLess(sum(losses[-3:]) / 3, 0.8 * sum(losses[:3]) / 3, losses)

    def test_dab_detr_loss_decreases(self):
        losses = self._loss_curve("dab_detr_tiny_parity.yaml")
        self.assertLess(sum(losses[-3:]) / 3, 0.8 * sum(losses[:3]) / 3, losses)


if __name__ == "__main__":
    unittest.main()
