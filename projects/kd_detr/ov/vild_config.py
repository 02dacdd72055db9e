# Copyright (c) kd_detr contributors.
"""Config keys of ViLD on Detectron2's Faster R-CNN (``MODEL.OV.VILD.*``)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_vild_config", "regionclip_enabled", "vild_uses_clip_regions"]


def add_vild_config(cfg):
    """Add ``MODEL.OV.VILD`` to a config that already has ``MODEL.OV``, in place.

    ViLD-text reads ``MODEL.OV.*`` (text embeddings, temperature, background, loss); the keys
    here add ViLD-image distillation and the ViLD-ensemble score.
    """
    cfg.MODEL.OV.VILD = CN()
    # Pick the rows of MODEL.OV.TEXT_EMBEDDINGS by the class names of DATASETS.TRAIN[0] (training
    # vocabulary) and of MODEL.OV.TEST_TEXT_EMBEDDINGS (else TEXT_EMBEDDINGS) by those of
    # DATASETS.TEST[0] (test vocabulary), so one 80-class COCO file (Detic's
    # coco_clip_a+cname.npy) serves the 48 base / 65 OVD classes. Off: rows are in class order.
    cfg.MODEL.OV.VILD.VOCABULARY_FROM_DATASETS = False
    # Weight of the ViLD-image L1 loss between the normalised projected region embedding and the
    # CLIP image embedding of precomputed regions (ViLD R50: 0.5; R152: 1.0, ensemble 2.0).
    # 0 = ViLD-text only (no region cache needed).
    cfg.MODEL.OV.VILD.IMAGE_LOSS_WEIGHT = 0.0
    # Folder of tools/precompute_clip_regions.py's cache (the hashed folder the tool prints).
    cfg.MODEL.OV.VILD.REGION_CACHE_DIR = ""
    # Cached regions used per image and iteration, drawn at random without replacement from
    # the cached ones (all when fewer). ViLD distils up to 300 precomputed regions per image.
    cfg.MODEL.OV.VILD.REGIONS_PER_IMAGE = 300
    # Where distilled regions get their embedding: "shared" (ViLD: the text branch's box head
    # and projection) or "separate" (ViLD-ensemble: a second box head + projection, trained by
    # the image loss only).
    cfg.MODEL.OV.VILD.IMAGE_BRANCH = "shared"
    # ViLD-ensemble at inference (needs IMAGE_BRANCH "separate"): per class, geometric mean of
    # the text-branch and image-branch probabilities, base p_text^w * p_image^(1-w), novel
    # p_text^(1-w) * p_image^w, with w = ENSEMBLE_WEIGHT (ViLD: 2/3).
    cfg.MODEL.OV.VILD.ENSEMBLE = False
    cfg.MODEL.OV.VILD.ENSEMBLE_WEIGHT = 2.0 / 3.0
    # Which classes are novel. "" = the test-vocabulary classes whose text embedding is not in
    # the training vocabulary (COCO-OVD: 48 train rows, 65 test rows). Or an LVIS-style
    # categories json (cat_info list, or a dict with "categories") whose "r" (rare) classes are
    # novel: in every vocabulary with as many classes, their logits are masked to -inf in the
    # training loss (ViLD multiplies them by 0 instead) and they count as novel in the ensemble.
    cfg.MODEL.OV.VILD.NOVEL_CATEGORIES = ""


def regionclip_enabled(cfg) -> bool:
    """True when a RegionCLIP alignment loss is on (``MODEL.OV.REGIONCLIP.*_WEIGHT > 0``)."""
    rc = cfg.MODEL.OV.REGIONCLIP
    return rc.CONTRASTIVE_WEIGHT > 0 or rc.DISTILL_WEIGHT > 0


def vild_uses_clip_regions(cfg) -> bool:
    """True when ViLD training needs the cached CLIP regions (ViLD-image or RegionCLIP losses)."""
    return cfg.MODEL.OV.VILD.IMAGE_LOSS_WEIGHT > 0 or regionclip_enabled(cfg)
