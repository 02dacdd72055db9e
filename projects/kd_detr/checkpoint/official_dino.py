# Copyright (c) kd_detr contributors.
"""IDEA-Research/DINO checkpoints (``--source dino``), the official 4-scale models.

Layout (``{"model": state_dict}``, read from ``models/dino/{dino,deformable_transformer}.py``):
a torchvision ResNet under ``backbone.0.body``; ``input_proj.l`` = (Conv2d, GroupNorm);
``transformer.level_embed``; Deformable DETR's encoder and decoder layers (decoder ``norm1``
after the cross-attention, ``norm2`` after the packed ``nn.MultiheadAttention`` self-attention:
kd_detr's order is the reverse); ``transformer.decoder.norm`` and ``ref_point_head``;
``transformer.tgt_embed`` (the learned content queries); ``transformer.enc_output(_norm)`` and
the encoder heads ``transformer.enc_out_{class,bbox}_embed``; ``label_enc`` (denoising labels,
``dn_labelbook_size + 1`` rows). The decoder heads are one module repeated per layer
(``class_embed.i`` / ``bbox_embed.i``, again as ``transformer.decoder.*``): all copies must be
equal and become kd_detr's shared heads. COCO heads have 91 category-id slots (92 label rows).
"""
import logging
from typing import Dict

import torch

from .official_deformable_detr import DEFORMABLE_DETR_RULES
from .registry import register_checkpoint_converter
from .rename import (
    Tied,
    adapt_class_rows,
    check_hidden_size,
    load_state_dict,
    rename_keys,
    torchvision_backbone,
)

__all__ = ["DINO_RULES", "convert_official_dino", "finish_dino_conversion"]

logger = logging.getLogger(__name__)

_HEADS = r"(class_embed|bbox_embed)"
DINO_RULES = [
    (r"transformer\.decoder\." + _HEADS + r"\.(\d+)\.(.+)", Tied(r"\1.0.\3")),
    (_HEADS + r"\.0\.(.+)", r"\1.\2"),
    (_HEADS + r"\.([1-9]\d*)\.(.+)", Tied(r"\1.0.\3")),
    (r"transformer\.decoder\.(norm|ref_point_head)\.(.+)", r"transformer.decoder.\1.\2"),
    (r"transformer\.tgt_embed\.weight", "tgt_embed.weight"),
    (r"transformer\.enc_out_(class|bbox)_embed\.(.+)", r"enc_\1_embed.\2"),
    (r"label_enc\.weight", "denoising.label_enc.weight"),
    *DEFORMABLE_DETR_RULES,
]


def finish_dino_conversion(state: Dict[str, torch.Tensor], cfg, coco_classes: str) -> Dict:
    """Size checks and class-row mapping of a state dict with kd_detr DINO names."""
    d = cfg.MODEL.DETR
    check_hidden_size(state, cfg, "input_proj.0.0.weight")
    queries = state.get("tgt_embed.weight")
    if queries is None and d.DINO.LEARNED_CONTENT:
        raise ValueError(
            "the checkpoint has no learned content queries (tgt_embed): set "
            "MODEL.DETR.DINO.LEARNED_CONTENT False"
        )
    if queries is not None and queries.shape[0] != d.NUM_QUERIES:
        raise ValueError(
            f"queries: tgt_embed.weight has {queries.shape[0]} rows but "
            f"MODEL.DETR.NUM_QUERIES={d.NUM_QUERIES}"
        )
    hint = f"MODEL.DETR.NUM_CLASSES={d.NUM_CLASSES}"
    for head in ("class_embed", "enc_class_embed"):
        for param in ("weight", "bias"):
            adapt_class_rows(state, f"{head}.{param}", d.NUM_CLASSES, False, coco_classes, hint)
    label_key = "denoising.label_enc.weight"
    if label_key in state and not d.DN.ENABLED:
        logger.info("Dropping %s: denoising is off (MODEL.DETR.DN.ENABLED False)", label_key)
        del state[label_key]
    adapt_class_rows(state, label_key, d.NUM_CLASSES + 1, True, coco_classes, hint + " + 1")
    return state


@register_checkpoint_converter("dino")
def convert_official_dino(source, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """IDEA-Research/DINO checkpoint (path or state dict) -> kd_detr ``DINO`` state dict."""
    if cfg.MODEL.META_ARCHITECTURE != "DINO":
        raise ValueError(f"--source dino needs a DINO config, got {cfg.MODEL.META_ARCHITECTURE}")
    state = load_state_dict(source)
    if "transformer.enc_out_class_embed.weight" not in state:
        raise ValueError(
            "not an IDEA-Research/DINO checkpoint: no transformer.enc_out_class_embed.weight "
            "(Deformable DETR checkpoints: --source deformable_detr)"
        )
    backbone, rest = torchvision_backbone(state, "backbone.0.body.")
    converted = rename_keys(rest, DINO_RULES, "IDEA-Research/DINO")
    converted.update(backbone)
    return finish_dino_conversion(converted, cfg, coco_classes)
