# Copyright (c) kd_detr contributors.
"""Config keys of D-FINE (``MODEL.DFINE``), added by add_rtdetr_config (modeling/config.py)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_dfine_config"]


def add_dfine_config(cfg):
    # D-FINE (meta-architecture "DFINE") is RT-DETR with D-FINE's encoder blocks and decoder: it
    # reads MODEL.RTDETR.* (encoder sizes; CSP_BLOCKS = round(3 x D-FINE's depth_mult);
    # DEC_N_POINTS, OFFSET_SCALE, SAMPLING_METHOD; matcher alpha / gamma; VERSION is ignored),
    # MODEL.DETR.* as RT-DETR does, and these keys.
    cfg.MODEL.DFINE = CN()
    # Every edge distance is a distribution over NUM_BINS + 1 bins of the weighting function.
    cfg.MODEL.DFINE.NUM_BINS = 32
    # Weighting-function curvature (REG_SCALE) and range (UP): bins span +-2 x UP x REG_SCALE.
    cfg.MODEL.DFINE.REG_SCALE = 4.0
    cfg.MODEL.DFINE.UP = 0.5
    # Location-quality estimator: top-K probabilities per edge, MLP width and depth.
    cfg.MODEL.DFINE.LQE_TOP_K = 4
    cfg.MODEL.DFINE.LQE_HIDDEN_DIM = 64
    cfg.MODEL.DFINE.LQE_LAYERS = 2
    # Losses added to RT-DETR's (varifocal / L1 / GIoU on every layer, the coarse layer-0 boxes
    # "_pre", the selected encoder tokens "_enc" and the denoising queries "_dn"): fine-grained
    # localization (loss_fgl) on every layer, and GO-LSD self-distillation (loss_ddf: every
    # layer but the last learns the last layer's box distributions at temperature
    # DDF_TEMPERATURE). D-FINE's weights: 0.15 and 1.5.
    cfg.MODEL.DFINE.FGL_WEIGHT = 0.15
    cfg.MODEL.DFINE.DDF_WEIGHT = 1.5
    cfg.MODEL.DFINE.GO_LSD = True
    cfg.MODEL.DFINE.DDF_TEMPERATURE = 5.0
    # GO-LSD's union matching: the box losses (L1, GIoU, FGL, DDF) of every layer and of the
    # coarse / encoder boxes use the union of all layers' and the encoder's matches (each query
    # paired with its most frequent target), normalised by the union's size; the class losses
    # keep each layer's own matching (official D-FINE's use_uni_set).
    cfg.MODEL.DFINE.UNION_MATCHING = True
