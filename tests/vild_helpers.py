# Copyright (c) kd_detr contributors.
"""Shared fixtures of the ViLD tests: a tiny ViLD ROI-heads config and a coco128 COCO-OVD
subset with a CLIP region cache from a tiny random CLIP."""
import os
import shutil
import tempfile
import unittest
import uuid

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from kd_detr.config import load_config
from kd_detr.ov import COCO_OVD_NOVEL_IDS, register_coco_ovd
from kd_detr.ov.clip_regions import ClipRegionCache, precompute_clip_regions
from kd_detr.ov.region_proposals import load_proposals_file

from .common import shared_data
from .test_vild_clip_regions import coco128_subset, make_tiny_clip, proposals_json


def tiny_vild_roi_cfg(text_embeddings, image_loss_weight=0.5, **vild):
    """ViLDROIHeads on one 'p3' feature, 8 regions per image, a 16-d box head, 8-d text
    embeddings from ``text_embeddings``; ``vild`` sets MODEL.OV.VILD.* keys."""
    cfg = load_config(freeze=False, register_datasets=False)
    cfg.MODEL.ROI_HEADS.NAME = "ViLDROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p3"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 8
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    cfg.MODEL.OV.TEXT_EMBEDDINGS = text_embeddings
    cfg.MODEL.OV.EMBED_DIM = 8
    cfg.MODEL.OV.VILD.IMAGE_LOSS_WEIGHT = image_loss_weight
    for key, value in vild.items():
        cfg.MODEL.OV.VILD[key] = value
    return cfg


class Coco128ViLDData:
    """COCO-OVD train / val splits of a few coco128 images (val with novel classes), registered
    under unique names, and a CLIP region cache of 8 proposals per training image computed by a
    tiny random 512-d CLIP (the text embedding size). Call :meth:`remove` when done."""

    def __init__(self, tmp, prefix, num_train, num_val):
        tag = uuid.uuid4().hex[:6]
        self.train_name, self.val_name = f"{prefix}_train_{tag}", f"{prefix}_val_{tag}"
        train_json, train_root, coco = coco128_subset(tmp, "train2017", num_train)
        val_json, val_root, _ = coco128_subset(tmp, "val2017", num_val, COCO_OVD_NOVEL_IDS)
        ovd_cache = os.path.join(tmp, "ovd")
        register_coco_ovd(self.train_name, train_json, train_root, "train", ovd_cache)
        register_coco_ovd(self.val_name, val_json, val_root, "val", ovd_cache, vocabulary=65)
        _, _, clip = make_tiny_clip(tmp, embed_dim=512)
        self.proposals = proposals_json(tmp, coco)
        by_image = load_proposals_file(self.proposals)
        self.regions = ClipRegionCache.create(os.path.join(tmp, "regions"), {"test": tag})
        precompute_clip_regions(
            DatasetCatalog.get(self.train_name),
            lambda record, image: by_image[str(record["image_id"])],
            clip,
            self.regions,
            num_proposals=8,
            show_progress=False,
        )
        self.text = shared_data("clip_text", "coco_clip_a+cname.npy")

    def remove(self):
        for name in (self.train_name, self.val_name):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


class Coco128ViLDCase(unittest.TestCase):
    """Test case with a :class:`Coco128ViLDData` of ``num_train`` / ``num_val`` images for the
    whole class: ``cls.train_name``, ``cls.val_name``, ``cls.proposals``, ``cls.regions``,
    ``cls.text``, all removed afterwards."""

    prefix, num_train, num_val = "vild_case", 4, 2

    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.tmp = tempfile.mkdtemp(prefix=f"kd_{cls.prefix}_")
        cls.data = Coco128ViLDData(cls.tmp, cls.prefix, cls.num_train, cls.num_val)
        cls.train_name, cls.val_name = cls.data.train_name, cls.data.val_name
        cls.proposals, cls.regions, cls.text = cls.data.proposals, cls.data.regions, cls.data.text

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        cls.data.remove()
