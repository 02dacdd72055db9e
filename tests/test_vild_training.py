# Copyright (c) kd_detr contributors.
"""ViLD (text + image) trains on real coco128 base-class images with Detic's real COCO CLIP text
embeddings and a CLIP region cache, then evaluates novel / base AP50 (configs/ov demo config)."""
import os
import unittest
import uuid

import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.utils.events import EventStorage

from kd_detr.config import load_config
from kd_detr.engine import Trainer
from kd_detr.ov import COCO_OVD_BASE_IDS, load_text_embeddings
from kd_detr.ov.vild_data import ViLDDatasetMapper
from tests.common import REPO_ROOT
from tests.vild_helpers import Coco128ViLDCase

CONFIG = os.path.join(REPO_ROOT, "configs", "ov", "vild_efflite0_fpn_coco128_ovd.yaml")


class TestViLDTraining(Coco128ViLDCase):
    prefix, num_train, num_val = "vild_test", 6, 3

    def _cfg(self, **extra):
        cfg = load_config(CONFIG, freeze=False, register_datasets=False)
        cfg.DATASETS.COCO_OVD = []
        cfg.DATASETS.TRAIN = (self.train_name,)
        cfg.DATASETS.TEST = (self.val_name,)
        cfg.MODEL.OV.TEXT_EMBEDDINGS = self.text
        cfg.MODEL.OV.VILD.IMAGE_LOSS_WEIGHT = 0.5
        cfg.MODEL.OV.VILD.REGION_CACHE_DIR = self.regions.directory
        cfg.MODEL.OV.VILD.REGIONS_PER_IMAGE = 5
        cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False
        cfg.INPUT.MIN_SIZE_TRAIN = (224,)
        cfg.INPUT.MIN_SIZE_TEST = 224
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.SOLVER.MAX_ITER = 2
        cfg.SOLVER.WARMUP_ITERS = 1
        cfg.SOLVER.STEPS = ()
        cfg.OUTPUT_DIR = os.path.join(self.tmp, f"out_{uuid.uuid4().hex[:6]}")
        cfg.merge_from_list([x for kv in extra.items() for x in kv])
        return cfg

    def test_mapper_attaches_transformed_regions(self):
        cfg = self._cfg(**{"INPUT.RANDOM_FLIP": "none"})
        mapper = ViLDDatasetMapper(cfg, True)
        record = DatasetCatalog.get(self.train_name)[0]
        out = mapper(record)
        regions = out["distill_regions"]
        cached = self.regions.load(record["image_id"])
        self.assertEqual(len(regions), min(5, len(cached["boxes"])))
        scale = out["image"].shape[1] / record["height"]
        for box, emb in zip(regions.proposal_boxes.tensor, regions.clip_embeds):
            row = int(np.argmin(np.abs(cached["embeddings"] - emb.numpy()).sum(1)))
            expected = np.clip(cached["boxes"][row] * scale, 0, None)
            expected[[0, 2]] = np.minimum(expected[[0, 2]], out["image"].shape[2])
            expected[[1, 3]] = np.minimum(expected[[1, 3]], out["image"].shape[1])
            np.testing.assert_allclose(box.numpy(), expected, rtol=1e-3, atol=0.05)
            np.testing.assert_array_equal(emb.numpy(), cached["embeddings"][row])
        missing = dict(record, image_id=987654321)
        with self.assertRaisesRegex(FileNotFoundError, "image 987654321"):
            mapper(missing)

    def test_one_step_losses_and_gradients(self):
        cfg = self._cfg()
        model = Trainer.build_model(cfg)
        head = model.roi_heads.box_predictor.cls_score
        # the training vocabulary is the 48 base rows of the 80-row file, normalised
        all_rows = load_text_embeddings(self.text, expected_num=80)
        ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
        base_rows = [ids.index(i) for i in sorted(COCO_OVD_BASE_IDS)]
        torch.testing.assert_close(head.train_vocabulary, all_rows[base_rows])
        self.assertEqual(tuple(head.test_vocabulary.shape), (65, 512))
        batch = next(iter(Trainer.build_train_loader(cfg)))
        self.assertTrue(all(len(x["distill_regions"]) > 0 for x in batch))
        with EventStorage():
            losses = model(batch)
        self.assertEqual(
            set(losses), {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc",
                          "loss_vild_image"},
        )  # fmt: skip
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))
        sum(losses.values()).backward()
        self.assertGreater(head.proj.weight.grad.abs().sum().item(), 0)
        self.assertGreater(head.bg_embedding.grad.abs().sum().item(), 0)
        self.assertFalse(head.train_vocabulary.requires_grad)

    def test_train_checkpoint_and_evaluate(self):
        cfg = self._cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})  # untrained: low scores
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        head = trainer.model.roi_heads.box_predictor.cls_score
        vocab = head.train_vocabulary.clone()
        proj = head.proj.weight.detach().clone()
        trainer.train()
        torch.testing.assert_close(head.train_vocabulary, vocab, rtol=0, atol=0)
        self.assertFalse(torch.equal(head.proj.weight.detach(), proj))
        state = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
        self.assertIn("roi_heads.box_predictor.cls_score.proj.weight", state["model"])
        self.assertFalse([k for k in state["model"] if "vocabulary" in k])
        results = trainer._last_eval_results
        metrics = results.get(self.val_name, results)["bbox"]
        for key in ("AP50-novel", "AP50-base", "AP50-all"):
            self.assertTrue(0.0 <= metrics[key] <= 100.0, (key, metrics[key]))
        self.assertGreater(metrics["AP50-novel-num_classes"], 0)  # the 65-class test vocabulary


if __name__ == "__main__":
    unittest.main()
