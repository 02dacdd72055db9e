# Copyright (c) kd_detr contributors.
"""Config keys of Deformable DETR (``MODEL.DETR.DEFORMABLE``), added by add_kd_detr_config."""
from detectron2.config import CfgNode as CN

__all__ = ["add_deformable_detr_config"]


def add_deformable_detr_config(cfg):
    # Deformable DETR (meta-architecture "DeformableDETR", transformer "DeformableTransformer"):
    # reads MODEL.DETR.* (width, heads, depths, FFN width, dropout, losses, matcher, NUM_QUERIES
    # = detection queries or two-stage proposals) and these keys. Always sigmoid focal loss
    # (MODEL.DETR.USE_FOCAL_LOSS True).
    cfg.MODEL.DETR.DEFORMABLE = CN()
    # Backbone maps projected to width d, fine to coarse (e.g. res3, res4, res5: strides 8-32).
    cfg.MODEL.DETR.DEFORMABLE.IN_FEATURES = ["res3", "res4", "res5"]
    # Feature levels L; levels beyond IN_FEATURES are 3x3 stride-2 convs on the last backbone map
    # (then on the previous extra level): the paper's 4 levels = res3..res5 + one extra (s64).
    cfg.MODEL.DETR.DEFORMABLE.NUM_FEATURE_LEVELS = 4
    # Sampling points per head and level in encoder / decoder deformable attention.
    cfg.MODEL.DETR.DEFORMABLE.ENC_N_POINTS = 4
    cfg.MODEL.DETR.DEFORMABLE.DEC_N_POINTS = 4
    # Iterative bounding box refinement: each decoder layer refines the previous layer's boxes
    # with its own box head (and class head); references become 4-d boxes after layer 0.
    cfg.MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE = False
    # Two-stage: every encoder token proposes a box; the top NUM_QUERIES proposals (by the
    # encoder's class-agnostic score) become the decoder's reference boxes and queries.
    cfg.MODEL.DETR.DEFORMABLE.TWO_STAGE = False
    # Sampling kernel: "auto" (a compiled kernel when installed and applicable, else "pytorch"),
    # "pytorch" (F.grid_sample, always available) or "cuda" (the official compiled op).
    cfg.MODEL.DETR.DEFORMABLE.ATTN_KERNEL = "auto"
    # Clamp of inverse_sigmoid in box predictions and refinement (paper code and HF: 1e-5).
    cfg.MODEL.DETR.DEFORMABLE.INVERSE_SIGMOID_EPS = 1e-5
    # Weight of the two-stage encoder-proposal losses relative to CLASS/BBOX/GIOU_WEIGHT.
    cfg.MODEL.DETR.DEFORMABLE.ENC_LOSS_WEIGHT = 1.0
