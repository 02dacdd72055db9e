# Copyright (c) kd_detr contributors.
"""Config keys of RT-DETR / RT-DETRv2 (``MODEL.RTDETR``) and of the real-time family's backbones,
ResNet-vd (``MODEL.RESNET_VD``) and HGNetv2 (``MODEL.HGNETV2``), added by add_kd_detr_config."""
from detectron2.config import CfgNode as CN

from .dfine_config import add_dfine_config

__all__ = ["add_rtdetr_config"]


def add_rtdetr_config(cfg):
    # ResNet-vd ("build_resnet_vd_backbone"): deep stem, average-pool shortcuts (RT-DETR's PResNet).
    cfg.MODEL.RESNET_VD = CN()
    cfg.MODEL.RESNET_VD.DEPTH = 50  # 18, 34, 50 or 101
    cfg.MODEL.RESNET_VD.OUT_FEATURES = ["res3", "res4", "res5"]
    # Detectron2 norm name; RT-DETR freezes the BatchNorm statistics of R50/R101 ("FrozenBN") and
    # trains those of R18/R34 ("BN").
    cfg.MODEL.RESNET_VD.NORM = "FrozenBN"
    # Freeze the stem (1) and res2 .. res{FREEZE_AT} (>= 2); 0 trains everything.
    cfg.MODEL.RESNET_VD.FREEZE_AT = 0
    cfg.MODEL.RESNET_VD.STEM_CHANNELS = 64

    # HGNetv2 ("build_hgnetv2_backbone", D-FINE's backbone): the architecture fields of
    # transformers' HGNetV2Config; defaults = its defaults (PP-HGNetV2-B4, D-FINE-L).
    cfg.MODEL.HGNETV2 = CN()
    cfg.MODEL.HGNETV2.STEM_CHANNELS = [3, 32, 48]  # (input, middle, output)
    cfg.MODEL.HGNETV2.STAGE_IN_CHANNELS = [48, 128, 512, 1024]
    cfg.MODEL.HGNETV2.STAGE_MID_CHANNELS = [48, 96, 192, 384]
    cfg.MODEL.HGNETV2.STAGE_OUT_CHANNELS = [128, 512, 1024, 2048]
    cfg.MODEL.HGNETV2.STAGE_NUM_BLOCKS = [1, 1, 3, 1]
    cfg.MODEL.HGNETV2.STAGE_DOWNSAMPLE = [False, True, True, True]
    cfg.MODEL.HGNETV2.STAGE_LIGHT_BLOCK = [False, False, True, True]
    cfg.MODEL.HGNETV2.STAGE_KERNEL_SIZE = [3, 3, 5, 5]
    cfg.MODEL.HGNETV2.STAGE_NUM_LAYERS = [6, 6, 6, 6]
    # Learnable affine blocks (a scalar scale and bias after every activation; D-FINE N/S/M).
    cfg.MODEL.HGNETV2.USE_LAB = False
    cfg.MODEL.HGNETV2.OUT_FEATURES = ["stage2", "stage3", "stage4"]
    cfg.MODEL.HGNETV2.NORM = "FrozenBN"
    # Freeze the stem (1) and stage1 .. stage{FREEZE_AT - 1}; 0 trains everything.
    cfg.MODEL.HGNETV2.FREEZE_AT = 0

    # RT-DETR (meta-architecture "RTDETR"). Shared keys read from MODEL.DETR: NUM_CLASSES,
    # HIDDEN_DIM (decoder width d), NUM_QUERIES (top-K encoder tokens), DEC_LAYERS, NHEADS and
    # DIM_FEEDFORWARD (decoder), DROPOUT, ACTIVATION (decoder FFN), FOCAL_ALPHA / FOCAL_GAMMA (the
    # varifocal loss' alpha 0.75 and gamma 2), CLASS_WEIGHT (varifocal) / BBOX_WEIGHT /
    # GIOU_WEIGHT, COST_CLASS / COST_BBOX / COST_GIOU, DEEP_SUPERVISION, TEST_TOPK,
    # SIZE_DIVISIBILITY, GROUP_DECODING, DEFORMABLE.ATTN_KERNEL and DN.* (contrastive denoising:
    # DN.NUM_QUERIES = Hugging Face's num_denoising, DN.LABEL_NOISE_RATIO = half its
    # label_noise_ratio, DN.BOX_NOISE_SCALE = box_noise_scale). configs/Base-RT-DETR.yaml sets
    # RT-DETR's values.
    cfg.MODEL.RTDETR = CN()
    # 1: RT-DETR; 2: RT-DETRv2 (decoder sampling points per level, SAMPLING_METHOD). Both read
    # DEC_N_POINTS and OFFSET_SCALE; v1 needs one point count for all levels and offset scale 0.5.
    cfg.MODEL.RTDETR.VERSION = 1
    # Backbone maps fed to the hybrid encoder, fine to coarse (strides 8, 16, 32).
    cfg.MODEL.RTDETR.IN_FEATURES = ["res3", "res4", "res5"]
    # Hybrid encoder: width, AIFI transformer (layers, heads, FFN width, activation, pre-norm,
    # position temperature) on the levels ENCODE_LEVELS, CCFF fusion (CSP hidden-width factor,
    # RepVGG blocks per CSP block, activation).
    cfg.MODEL.RTDETR.ENCODER_HIDDEN_DIM = 256
    cfg.MODEL.RTDETR.ENCODER_LAYERS = 1
    cfg.MODEL.RTDETR.ENCODER_NHEADS = 8
    cfg.MODEL.RTDETR.ENCODER_FFN_DIM = 1024
    cfg.MODEL.RTDETR.ENCODER_ACTIVATION = "gelu"
    cfg.MODEL.RTDETR.ENCODER_PRE_NORM = False
    cfg.MODEL.RTDETR.POSITION_TEMPERATURE = 10000.0
    cfg.MODEL.RTDETR.ENCODE_LEVELS = [2]
    cfg.MODEL.RTDETR.HIDDEN_EXPANSION = 1.0
    cfg.MODEL.RTDETR.CSP_BLOCKS = 3
    cfg.MODEL.RTDETR.CCFF_ACTIVATION = "silu"
    # Decoder levels: the encoder's maps plus stride-2 convs on the coarsest (if more).
    cfg.MODEL.RTDETR.NUM_FEATURE_LEVELS = 3
    # Sampling points of the decoder's deformable attention: one value for every level, or one
    # per level (v2).
    cfg.MODEL.RTDETR.DEC_N_POINTS = [4]
    # Offsets are scaled by OFFSET_SCALE * box size / points (0.5 in v1 and v2).
    cfg.MODEL.RTDETR.OFFSET_SCALE = 0.5
    # v2: "default" (bilinear) or "discrete" (nearest cell, for TensorRT without grid_sample).
    cfg.MODEL.RTDETR.SAMPLING_METHOD = "default"
    # Content queries: NUM_QUERIES learned embeddings instead of the selected encoder features.
    cfg.MODEL.RTDETR.LEARN_INITIAL_QUERY = False
    # Look forward twice (official code): layer l's box loss also trains layer l-1's box head.
    cfg.MODEL.RTDETR.LOOK_FORWARD_TWICE = True
    # Focal matching cost alpha / gamma (the varifocal loss uses MODEL.DETR.FOCAL_ALPHA).
    cfg.MODEL.RTDETR.MATCHER_ALPHA = 0.25
    cfg.MODEL.RTDETR.MATCHER_GAMMA = 2.0
    # Weight of the selected encoder tokens' losses (loss_*_enc) relative to the decoder's.
    cfg.MODEL.RTDETR.ENC_LOSS_WEIGHT = 1.0
    add_dfine_config(cfg)  # D-FINE builds on these keys
