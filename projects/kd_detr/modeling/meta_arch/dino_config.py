# Copyright (c) kd_detr contributors.
"""Config keys of DINO (``MODEL.DETR.DINO``), added by add_kd_detr_config."""
from detectron2.config import CfgNode as CN

__all__ = ["add_dino_config"]


def add_dino_config(cfg):
    # DINO (meta-architecture "DINO", transformer "DINOTransformer") also reads MODEL.DETR.*
    # (width, depths, NUM_QUERIES = the top-K encoder proposals, losses, matcher),
    # MODEL.DETR.DEFORMABLE.* (levels, sampling points, kernel, INVERSE_SIGMOID_EPS; its
    # WITH_BOX_REFINE / TWO_STAGE are ignored: DINO always refines boxes and selects queries from
    # the encoder) and MODEL.DETR.DN.* (contrastive denoising; configs/Base-DINO.yaml sets
    # DINO's values). Always sigmoid focal loss.
    cfg.MODEL.DETR.DINO = CN()
    # Look forward twice: layer i's box prediction starts from layer i-1's refined box without
    # detaching it, so its loss also trains layer i-1; the next layer's input stays detached.
    # False: both detached (Deformable DETR's refinement).
    cfg.MODEL.DETR.DINO.LOOK_FORWARD_TWICE = True
    # Mixed query selection: the top-K encoder proposals give the reference boxes and the
    # content queries are NUM_QUERIES learned embeddings (tgt_embed). False: the content is the
    # selected encoder features (detached), DINO's "pure" query selection.
    cfg.MODEL.DETR.DINO.LEARNED_CONTENT = True
    # Weight of the encoder's top-K proposal losses (loss_*_enc) relative to CLASS/BBOX/GIOU.
    cfg.MODEL.DETR.DINO.ENC_LOSS_WEIGHT = 1.0
    # One class head and one box head for all decoder layers (official DINO). False: each layer
    # has its own pair (detrex's DINO, class_embed.i / bbox_embed.i); layer i's box head both
    # predicts layer i's boxes and refines the reference layer i + 1 starts from, so with
    # look-forward-twice layer i + 1's box loss also trains it. The encoder's top-K proposal
    # heads are separate either way.
    cfg.MODEL.DETR.DINO.SHARE_HEADS = True
    # Added to feature-map positions before the sine encoding is normalised: the official code
    # uses 0.0 (with MODEL.DETR.POSITION_TEMPERATURE 20), detrex -0.5 (with temperature 10000).
    cfg.MODEL.DETR.DINO.POSITION_OFFSET = 0.0
