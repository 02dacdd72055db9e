# Copyright (c) kd_detr contributors.
"""Config keys of the open-vocabulary components (``MODEL.OV.*``)."""
from detectron2.config import CfgNode as CN

from ..config import CONFIG_EXTENSION_REGISTRY
from .detr_config import add_ov_detr_config
from .vild_config import add_vild_config

__all__ = ["add_ov_config"]


@CONFIG_EXTENSION_REGISTRY.register(name="ov")
def add_ov_config(cfg):
    """Add ``MODEL.OV`` (region-text classifier, vocabularies, losses) to a config, in place."""
    cfg.MODEL.OV = CN()
    # Class text embeddings (.npy of (C, D) rows in the dataset's class order), e.g. from
    # tools/build_text_embeddings.py or Detic's "*_clip_a+cname.npy". Rows are L2-normalised.
    cfg.MODEL.OV.TEXT_EMBEDDINGS = ""
    # Vocabulary used in eval mode ("" = TEXT_EMBEDDINGS), e.g. 48 base classes to train and
    # 65 (ViLD / RegionCLIP) or 80 (Detic) classes to test on COCO-OVD.
    cfg.MODEL.OV.TEST_TEXT_EMBEDDINGS = ""
    # Text embedding size D (512 for CLIP ViT-B/32, 1024 for RN50, 640 for RN50x4).
    cfg.MODEL.OV.EMBED_DIM = 512
    # Logits are cosine / TEMPERATURE: 0.01 in ViLD and RegionCLIP, 0.02 in Detic.
    cfg.MODEL.OV.TEMPERATURE = 0.01
    # Background logit: "learned" (ViLD: learnable normalised embedding), "zero" (RegionCLIP /
    # Detic: a fixed zero embedding, so a constant logit 0) or "none" (no background, sigmoid).
    cfg.MODEL.OV.BACKGROUND = "learned"
    # Learnable scalar added to every class logit, initialised to this value (Detic: -4.6 =
    # logit(0.01)); None = no bias.
    cfg.MODEL.OV.BIAS_INIT = None
    # "softmax" (cross-entropy over C classes + background) or "sigmoid" (binary CE per class).
    cfg.MODEL.OV.LOSS = "softmax"
    # Cross-entropy weight of the background class (RegionCLIP: COCO 0.2, LVIS 0.8).
    cfg.MODEL.OV.BG_LOSS_WEIGHT = 1.0
    # Detic's federated loss (sigmoid only): per iteration, binary CE over the ground-truth
    # classes plus classes sampled with weight image_count ** FED_LOSS_FREQ_WEIGHT_POWER, up to
    # FED_LOSS_NUM_CLASSES classes in all.
    cfg.MODEL.OV.USE_FED_LOSS = False
    cfg.MODEL.OV.FED_LOSS_NUM_CLASSES = 50
    cfg.MODEL.OV.FED_LOSS_FREQ_WEIGHT_POWER = 0.5
    # LVIS-style cat_info json with "image_count" (and "frequency") per category.
    cfg.MODEL.OV.CAT_FREQ_PATH = ""
    # Zero the counts of rare ("r") classes, so they are never sampled as negatives (the
    # open-vocabulary setting, where rare classes are unseen; Detic#79).
    cfg.MODEL.OV.FED_LOSS_ZERO_RARE = True
    add_ov_detr_config(cfg)
    add_vild_config(cfg)
