# Copyright (c) kd_detr contributors.
"""RegionCLIP-style alignment in ViLD's ROI heads: the losses equal a hand-wired call of the
kd_detr.ov.regionclip functions on the same region embeddings, gradients reach the student
projection and never the teacher (CLIP) embeddings, and the coco128 RegionCLIP config trains."""
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from kd_detr.config import load_config
from kd_detr.engine import Trainer
from kd_detr.ov.regionclip import (
    pseudo_region_labels,
    region_concept_contrastive_loss,
    region_concept_distillation_loss,
)
from tests.common import REPO_ROOT
from tests.vild_helpers import Coco128ViLDCase, tiny_vild_roi_cfg

CONFIG = os.path.join(REPO_ROOT, "configs", "ov", "regionclip_efflite0_fpn_coco128_ovd.yaml")
SHAPE = {"p3": ShapeSpec(channels=4, stride=8)}
TEMPERATURE, THRESHOLD = 0.1, 0.3
REGION_LOSSES = {"loss_regionclip_contrastive", "loss_regionclip_distill"}


class TestRegionCLIPInViLDHeads(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.tmp = tempfile.mkdtemp(prefix="kd_vild_regionclip_")
        gen = torch.Generator().manual_seed(0)
        cls.vocab = torch.randn(3, 8, generator=gen)
        cls.emb = os.path.join(cls.tmp, "emb.npy")
        np.save(cls.emb, cls.vocab.numpy())
        cls.concepts = torch.randn(5, 8, generator=gen)
        cls.concept_file = os.path.join(cls.tmp, "concepts.npy")
        np.save(cls.concept_file, cls.concepts.numpy())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def _cfg(self, image_loss_weight=0.0, concepts="", **vild):
        cfg = tiny_vild_roi_cfg(self.emb, image_loss_weight, **vild)
        rc = cfg.MODEL.OV.REGIONCLIP
        rc.CONCEPT_EMBEDDINGS = concepts
        rc.TEMPERATURE = TEMPERATURE
        rc.CONCEPT_THRESHOLD = THRESHOLD
        rc.CONTRASTIVE_WEIGHT = 1.5
        rc.DISTILL_WEIGHT = 0.5
        return cfg

    def _inputs(self, teacher_rows):
        """Features, proposals, targets and 2 images' distill regions (1 + 2) whose teacher
        embeddings are ``teacher_rows`` plus noise (so the teacher labels them confidently)."""
        torch.manual_seed(0)
        features = {"p3": torch.randn(2, 4, 8, 8)}
        teacher = (teacher_rows + 0.05 * torch.randn(teacher_rows.shape)) * 3.0
        teacher.requires_grad_(True)  # must receive no gradient
        proposals, targets, regions = [], [], []
        for i in range(2):
            p = Instances((64, 64))
            p.proposal_boxes = Boxes(torch.tensor([[4.0, 4, 30, 40], [10, 12, 50, 60]]))
            p.objectness_logits = torch.zeros(2)
            t = Instances((64, 64))
            t.gt_boxes = Boxes(torch.tensor([[5.0, 5, 30, 40]]))
            t.gt_classes = torch.tensor([i])
            r = Instances((64, 64))
            r.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 20, 20], [8, 16, 56, 60]])[: i + 1])
            r.clip_embeds = teacher[[0, 1, 2][i : 2 * i + 1]]
            proposals.append(p)
            targets.append(t)
            regions.append(r)
        return features, proposals, targets, regions, teacher

    def _check(self, heads, concepts, teacher_rows, student_branch):
        """Run the heads in training; compare with the regionclip functions wired by hand."""
        features, proposals, targets, regions, teacher = self._inputs(teacher_rows)
        heads.train()
        with EventStorage(), heads.distill_regions(regions):
            _, losses = heads(None, features, proposals, targets)
        # the student: the same regions pooled and embedded by hand
        pooled = heads.box_pooler([features["p3"]], [r.proposal_boxes for r in regions])
        head, projection = student_branch(heads)
        student = F.normalize(projection(torch.flatten(head(pooled), start_dim=1)), dim=1)
        unit_concepts = F.normalize(concepts, dim=1)
        pseudo = pseudo_region_labels(teacher.detach(), unit_concepts, TEMPERATURE, THRESHOLD)
        self.assertGreaterEqual(int(pseudo.keep.sum()), 2)  # the losses are not trivially 0
        contrastive = region_concept_contrastive_loss(student, unit_concepts, pseudo, TEMPERATURE)
        distill = region_concept_distillation_loss(student, unit_concepts, pseudo, TEMPERATURE)
        self.assertGreater(contrastive.item(), 0.0)
        self.assertGreater(distill.item(), 0.0)
        torch.testing.assert_close(
            losses["loss_regionclip_contrastive"], 1.5 * contrastive, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            losses["loss_regionclip_distill"], 0.5 * distill, rtol=1e-5, atol=1e-6
        )
        sum(losses[k] for k in REGION_LOSSES).backward()
        self.assertGreater(float(projection.weight.grad.abs().sum()), 0.0)
        self.assertIsNone(teacher.grad)
        return losses

    def test_shared_branch_with_training_vocabulary_as_concepts(self):
        heads = build_roi_heads(self._cfg(), SHAPE)
        self.assertTrue(heads.uses_distill_regions)
        self.assertEqual(list(heads.region_alignment.state_dict()), [])  # not in checkpoints
        predictor = heads.box_predictor
        # teacher regions near training classes 2, 0, 1
        losses = self._check(
            heads,
            self.vocab,
            self.vocab[[2, 0, 1]],
            lambda h: (h.box_head, h.box_predictor.cls_score.proj),
        )
        self.assertEqual(set(losses), {"loss_cls", "loss_box_reg"} | REGION_LOSSES)
        self.assertFalse(predictor.cls_score.train_vocabulary.requires_grad)

    def test_concept_file_and_separate_branch_with_image_loss(self):
        cfg = self._cfg(0.5, self.concept_file, IMAGE_BRANCH="separate")
        heads = build_roi_heads(cfg, SHAPE)
        self.assertEqual(tuple(heads.region_alignment.concepts.shape), (5, 8))
        losses = self._check(
            heads,
            self.concepts,
            self.concepts[[4, 1, 4]],
            lambda h: (h.image_box_head, h.image_projection),
        )
        self.assertEqual(
            set(losses), {"loss_cls", "loss_box_reg", "loss_vild_image"} | REGION_LOSSES
        )
        # the separate branch alone is trained by the region losses
        self.assertIsNone(heads.box_predictor.cls_score.proj.weight.grad)

    def test_off_by_default_and_errors(self):
        cfg = self._cfg()
        cfg.MODEL.OV.REGIONCLIP.CONTRASTIVE_WEIGHT = 0.0
        cfg.MODEL.OV.REGIONCLIP.DISTILL_WEIGHT = 0.0
        heads = build_roi_heads(cfg, SHAPE)
        self.assertIsNone(heads.region_alignment)
        self.assertFalse(heads.uses_distill_regions)
        features, proposals, targets, _, _ = self._inputs(self.vocab)
        heads.train()
        with EventStorage():
            _, losses = heads(None, features, proposals, targets)
        self.assertEqual(set(losses), {"loss_cls", "loss_box_reg"})
        heads = build_roi_heads(self._cfg(), SHAPE).train()
        with EventStorage(), self.assertRaisesRegex(ValueError, "REGIONCLIP.*ViLDRCNN"):
            heads(None, features, proposals, targets)
        with self.assertRaisesRegex(ValueError, "dimension 5 but the model expects 8"):
            wide = os.path.join(self.tmp, "wide.npy")
            np.save(wide, np.ones((4, 5), np.float32))
            build_roi_heads(self._cfg(concepts=wide), SHAPE)


class TestRegionCLIPCoco128Config(Coco128ViLDCase):
    """configs/ov/regionclip_efflite0_fpn_coco128_ovd.yaml trains 2 iterations on real coco128
    images with Detic's COCO text embeddings and a CLIP region cache from a tiny random CLIP."""

    prefix, num_train, num_val = "rclip_test", 4, 2

    def test_two_iterations(self):
        cfg = load_config(CONFIG, freeze=False, register_datasets=False)
        self.assertEqual(cfg.MODEL.OV.REGIONCLIP.CONTRASTIVE_WEIGHT, 1.0)
        self.assertEqual(cfg.MODEL.OV.REGIONCLIP.DISTILL_WEIGHT, 1.0)
        cfg.merge_from_list(
            ["DATASETS.COCO_OVD", "[]", "DATASETS.TRAIN", f"('{self.train_name}',)",
             "DATASETS.TEST", f"('{self.val_name}',)", "MODEL.OV.TEXT_EMBEDDINGS", self.text,
             "MODEL.OV.VILD.REGION_CACHE_DIR", self.regions.directory,
             # a random tiny CLIP is not confident: a low threshold still yields pseudo labels
             "MODEL.OV.REGIONCLIP.CONCEPT_THRESHOLD", "0.0",
             "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False", "INPUT.MIN_SIZE_TRAIN", "(192,)",
             "INPUT.MIN_SIZE_TEST", "192", "DATALOADER.NUM_WORKERS", "0",
             "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
             "SOLVER.STEPS", "()", "OUTPUT_DIR", os.path.join(self.tmp, "out")]
        )  # fmt: skip
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        heads = trainer.model.roi_heads
        self.assertEqual(tuple(heads.region_alignment.concepts.shape), (48, 512))  # base rows
        proj = heads.box_predictor.cls_score.proj.weight.detach().clone()
        trainer.train()
        history = trainer.storage.histories()
        for key in REGION_LOSSES:
            values = [v for v, _ in history[key].values()]
            self.assertEqual(len(values), 2, key)
            self.assertTrue(all(np.isfinite(values)), key)
        self.assertGreater(max(v for v, _ in history["loss_regionclip_distill"].values()), 0.0)
        self.assertFalse(torch.equal(heads.box_predictor.cls_score.proj.weight.detach(), proj))


if __name__ == "__main__":
    unittest.main()
