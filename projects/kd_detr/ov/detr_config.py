# Copyright (c) kd_detr contributors.
"""Config keys of the open-vocabulary DETR head, RegionCLIP-style alignment and config-driven
COCO-OVD datasets (hooked into :func:`kd_detr.ov.config.add_ov_config`)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_ov_detr_config"]


def add_ov_detr_config(cfg):
    """Add ``MODEL.OV.DETR_HEAD`` (options of the ``region_text`` class head),
    ``MODEL.OV.REGIONCLIP`` and ``DATASETS.COCO_OVD`` in place."""
    ov = cfg.MODEL.OV
    # DETR-family class head "region_text" (MODEL.DETR.CLASS_HEAD): the region-text classifier
    # of MODEL.OV.* (projection -> L2 norm -> cosine with the text embeddings /
    # MODEL.OV.TEMPERATURE) instead of the linear head on every decoder layer's query features.
    # Focal-loss models (DAB-DETR, Deformable, DINO) need MODEL.OV.BACKGROUND "none"; softmax
    # DETR "zero" or "learned".
    ov.DETR_HEAD = CN()
    # Pick and order the rows of MODEL.OV.TEXT_EMBEDDINGS by the class names of DATASETS.TRAIN[0]
    # (training vocabulary) and of DATASETS.TEST[0] (eval vocabulary; rows of
    # MODEL.OV.TEST_TEXT_EMBEDDINGS when set, else of TEXT_EMBEDDINGS). Row names come from the
    # file's JSON sidecar, or are the 80 COCO classes for an 80-row file without one (Detic's
    # coco_clip_a+cname.npy). Lets one 80-class file serve the 48 base / 65 OVD classes.
    ov.DETR_HEAD.VOCABULARY_FROM_DATASETS = False

    # RegionCLIP-style region-concept alignment (kd_detr.ov.regionclip).
    ov.REGIONCLIP = CN()
    # Concept text embeddings (.npy / .pth, (K, D)), e.g. nouns of a caption corpus ("" in ViLD:
    # the training vocabulary, MODEL.OV.TEXT_EMBEDDINGS' training rows).
    ov.REGIONCLIP.CONCEPT_EMBEDDINGS = ""
    # Temperature of the region-concept cosine logits (RegionCLIP: 0.01).
    ov.REGIONCLIP.TEMPERATURE = 0.01
    # A region gets a pseudo label only when the teacher's top concept probability is at least
    # this (RegionCLIP's CONCEPT_THRES: 0.1).
    ov.REGIONCLIP.CONCEPT_THRESHOLD = 0.1
    # Weights of the contrastive region-concept loss and of the teacher-student KL (RegionCLIP
    # pretraining: 1.0 each). 0 = off; either > 0 turns the alignment on in ViLD's ROI heads
    # (ViLDROIHeads), whose teacher regions are the cached CLIP regions of ViLD-image
    # (MODEL.OV.VILD.REGION_CACHE_DIR) and whose default concept pool is the training vocabulary.
    ov.REGIONCLIP.CONTRASTIVE_WEIGHT = 0.0
    ov.REGIONCLIP.DISTILL_WEIGHT = 0.0

    # COCO-OVD splits registered from the config, one string each:
    # "name,path/to/instances.json,path/to/image_root,train|val[,65|80]" (val vocabulary 65 by
    # default). Paths may start with $KD_DETR_SHARED_DATA (default ../shared/data).
    cfg.DATASETS.COCO_OVD = []
    # Where the derived split jsons are cached ("" = $KD_DETR_DATA/coco_ovd, else
    # ~/.cache/kd_detr/coco_ovd).
    cfg.DATASETS.COCO_OVD_CACHE_DIR = ""
