# Copyright (c) kd_detr contributors.
"""detrex ``projects/dino`` checkpoints (part of ``--source detrex``, chosen when the config is a
``DINO``).

Layout (read from detrex's ``projects/dino/modeling/{dino,dino_transformer}.py`` and
``configs/models/dino_r50.py``): Detectron2's ResNet, the ``ChannelMapper`` neck, encoder and
decoder ``BaseTransformerLayer``s, ``transformer.level_embeds`` and ``enc_output(_norm)`` named
as in detrex's Deformable DETR (:mod:`.detrex_deformable_detr`); ``transformer.decoder.norm`` and
``ref_point_head``; ``transformer.tgt_embed`` (the learned content queries); ``label_enc``, the
denoising label embedding with one row per class (no "no object" row).

Heads: ``class_embed.i`` / ``bbox_embed.i`` for i = 0 .. L are L + 1 separately trained copies
(detrex deep-copies one head per decoder layer), the last (i = L) scoring and boxing the encoder
proposals. The decoder holds the same ModuleLists again (``transformer.decoder.class_embed.i`` /
``bbox_embed.i``, tied duplicates): its layer i refines the reference box with ``bbox_embed.i``,
the head that also predicts layer i's boxes. They load into a DINO built with
``MODEL.DETR.DINO.SHARE_HEADS False``; into a shared-head DINO only when the L decoder copies are
identical. The encoder head is class-aware (DINO's ``two_stage_binary_cls`` False), so its rows
map by COCO category id like the decoder heads'.

Positional encoding: detrex's DINO encodes feature-map positions with temperature 10000 and
offset -0.5 (``PositionEmbeddingSine(..., temperature=10000, normalize=True, offset=-0.5)``),
the official code with 20 and 0: run converted detrex weights with
``MODEL.DETR.POSITION_TEMPERATURE 10000.0 MODEL.DETR.DINO.POSITION_OFFSET -0.5`` (a differing
config is converted with a warning: the weights load, the outputs drift).
"""
import logging
from typing import Dict, Mapping

import torch

from .deformable_common import pop_indexed_heads
from .detrex_deformable_detr import detrex_deformable_detr_rules
from .official_dino import finish_dino_conversion
from .rename import adapt_class_rows, rename_keys

__all__ = ["convert_detrex_dino", "is_detrex_dino"]

logger = logging.getLogger(__name__)

_MARKER = "transformer.decoder.ref_point_head.layers.0.weight"
_LABELS = "denoising.label_enc.weight"
# Parts of detrex's Deformable DETR that a DINO never has (their kd_detr names).
_NOT_DINO = ("reference_points.", "proposal_query.", "query_embed.")
# detrex DINO's feature-map position encoding, as kd_detr config values.
DETREX_POSITION = {
    "MODEL.DETR.POSITION_TEMPERATURE": 10000.0,
    "MODEL.DETR.DINO.POSITION_OFFSET": -0.5,
}


def is_detrex_dino(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a detrex state dict is a DINO (multi-scale, per-layer positional query head)."""
    return "transformer.level_embeds" in state and _MARKER in state


def detrex_dino_rules(num_backbone_levels: int):
    """Renaming rules; ``num_backbone_levels`` is the number of ``neck.convs``."""
    return [
        (r"transformer\.decoder\.(norm|ref_point_head)\.(.+)", r"transformer.decoder.\1.\2"),
        (r"transformer\.tgt_embed\.weight", "tgt_embed.weight"),
        (r"label_enc\.weight", _LABELS),
        # the heads and their tied decoder duplicates are renamed by the Deformable DETR rules
        *detrex_deformable_detr_rules(num_backbone_levels),
    ]


def _assemble_heads(state: Dict[str, torch.Tensor], cfg, coco_classes: str) -> None:
    """detrex's ``class_embed.i`` / ``bbox_embed.i`` (i = 0 .. L) -> kd_detr's per-layer or
    shared decoder heads and ``enc_*_embed``, in place; per-layer class rows adapted."""
    d = cfg.MODEL.DETR
    num_layers, share = d.DEC_LAYERS, d.DINO.SHARE_HEADS
    found = pop_indexed_heads(state)
    for name in ("class_embed", "bbox_embed"):
        heads = found.get(name, {})
        if sorted(heads) != list(range(num_layers + 1)):
            raise ValueError(
                f"heads: the checkpoint has {name}.{sorted(heads)} but the config needs "
                f"{name}.0-{num_layers}: MODEL.DETR.DEC_LAYERS={num_layers} decoder heads + the "
                "encoder's (detrex keeps it last)"
            )
        state.update({f"enc_{name}.{p}": v for p, v in heads.pop(num_layers).items()})
        if not share:
            for index, params in heads.items():
                state.update({f"{name}.{index}.{p}": v for p, v in params.items()})
            continue
        first = heads[0]
        for index, params in heads.items():
            if params.keys() != first.keys() or not all(
                torch.equal(v, first[p]) for p, v in params.items()
            ):
                raise ValueError(
                    f"heads: {name}.{index} differs from {name}.0: this detrex DINO has one head "
                    "per decoder layer but the config shares one across layers; set "
                    "MODEL.DETR.DINO.SHARE_HEADS False"
                )
        state.update({f"{name}.{p}": v for p, v in first.items()})
    if not share:
        hint = f"MODEL.DETR.NUM_CLASSES={d.NUM_CLASSES}"
        for index in range(num_layers):
            for param in ("weight", "bias"):
                key = f"class_embed.{index}.{param}"
                adapt_class_rows(state, key, d.NUM_CLASSES, False, coco_classes, hint)


def _add_no_object_label(state: Dict[str, torch.Tensor]) -> None:
    """Append kd_detr's "no object" row (index C) to detrex's C-row label embedding: DINO only
    uses it for padding slots, whose content is zeroed, so its value never matters; zeros."""
    labels = state.get(_LABELS)
    if labels is not None:
        state[_LABELS] = torch.cat([labels, labels.new_zeros(1, labels.shape[1])])


def _warn_position_encoding(cfg) -> None:
    d = cfg.MODEL.DETR
    current = {
        "MODEL.DETR.POSITION_TEMPERATURE": d.POSITION_TEMPERATURE,
        "MODEL.DETR.DINO.POSITION_OFFSET": d.DINO.POSITION_OFFSET,
    }
    wrong = [
        f"{key} {DETREX_POSITION[key]!r} (config: {float(value)!r})"
        for key, value in current.items()
        if value != DETREX_POSITION[key]
    ]
    if wrong:
        logger.warning(
            "detrex DINO encodes positions with temperature 10000 and offset -0.5; run the "
            "converted weights with %s, or the outputs will differ from detrex's",
            ", ".join(wrong),
        )


def convert_detrex_dino(
    state: Mapping[str, torch.Tensor], cfg, coco_classes: str = "auto"
) -> Dict[str, torch.Tensor]:
    """detrex DINO state dict -> kd_detr ``DINO`` state dict for ``cfg``.

    Raises:
        ValueError: for a state dict that is not a detrex DINO, unknown keys, tied copies that
            differ, per-layer heads into a shared-head config, and size or class mismatches.
    """
    if not is_detrex_dino(state):
        raise ValueError(
            "not a detrex DINO checkpoint (it needs transformer.level_embeds and "
            f"{_MARKER}): detrex DETR / DAB-DETR / Deformable DETR checkpoints need a DETR / "
            "DABDETR / DeformableDETR config"
        )
    convs = {key.split(".")[2] for key in state if key.startswith("neck.convs.")}
    converted = rename_keys(state, detrex_dino_rules(len(convs)), "detrex DINO")
    foreign = sorted(k for k in converted if k.startswith(_NOT_DINO))
    if foreign:
        raise ValueError(
            f"Cannot convert this detrex DINO checkpoint: it has Deformable DETR parts {foreign} "
            "that DINO does not have (a detrex Deformable DETR needs a DeformableDETR config)"
        )
    _assemble_heads(converted, cfg, coco_classes)
    _add_no_object_label(converted)
    _warn_position_encoding(cfg)
    return finish_dino_conversion(converted, cfg, coco_classes)
