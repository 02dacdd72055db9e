# Copyright (c) kd_detr contributors.
"""Config keys of query denoising (``MODEL.DETR.DN``)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_denoising_config", "denoising_args_from_config"]


def add_denoising_config(cfg):
    """Add ``MODEL.DETR.DN.*`` (needs ``MODEL.DETR``) to ``cfg`` in place."""
    cfg.MODEL.DETR.DN = CN()
    # Train with denoising queries (DN-DETR): noised ground-truth boxes and labels decoded next to
    # the detection queries, which cannot see them. Inference is unchanged.
    cfg.MODEL.DETR.DN.ENABLED = False
    # Denoising groups per batch (DN-DETR: 5), used when NUM_QUERIES is 0.
    cfg.MODEL.DETR.DN.NUM_GROUPS = 5
    # If > 0, a query budget instead of a fixed group count (DINO's dn_number, e.g. 100): groups =
    # max(1, NUM_QUERIES // largest object count in the batch); CONTRASTIVE doubles the queries.
    cfg.MODEL.DETR.DN.NUM_QUERIES = 0
    # Probability that a denoising label is resampled uniformly from the classes.
    cfg.MODEL.DETR.DN.LABEL_NOISE_RATIO = 0.2
    # lambda: centres move by up to lambda * (w/2, h/2), sizes scale by [1 - lambda, 1 + lambda].
    cfg.MODEL.DETR.DN.BOX_NOISE_SCALE = 0.4
    # DINO's contrastive denoising: each group adds negatives (corner noise in [lambda, 2 lambda)
    # half-sizes) that must predict "no object".
    cfg.MODEL.DETR.DN.CONTRASTIVE = False
    # Last content channel flags denoising (1) vs matching (0) queries, as DN-DAB-DETR; the label
    # embedding is then HIDDEN_DIM - 1 wide.
    cfg.MODEL.DETR.DN.LABEL_INDICATOR = True


def denoising_args_from_config(cfg):
    """Keyword arguments of :class:`DenoisingGenerator` (without C and d) from ``cfg``."""
    dn = cfg.MODEL.DETR.DN
    return {
        "num_groups": dn.NUM_GROUPS,
        "num_queries": dn.NUM_QUERIES,
        "label_noise_ratio": dn.LABEL_NOISE_RATIO,
        "box_noise_scale": dn.BOX_NOISE_SCALE,
        "contrastive": dn.CONTRASTIVE,
        "with_indicator": dn.LABEL_INDICATOR,
    }
