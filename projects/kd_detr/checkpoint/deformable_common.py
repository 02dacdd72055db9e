# Copyright (c) kd_detr contributors.
"""Steps shared by the Deformable DETR converters of official (fundamentalvision/Deformable-DETR,
:mod:`.official_deformable_detr`) and detrex (:mod:`.detrex_deformable_detr`) checkpoints, run on
the state dict once its keys carry kd_detr names.

Both sources keep every head in a list of ``num_pred`` modules (decoder layers, + the two-stage
encoder-proposal head last): distinct copies with box refinement, the same module repeated
without it (so the saved ``class_embed.0`` ... ``class_embed.{num_pred-1}`` are equal). kd_detr
keeps one shared head without box refinement and one per layer with it.

With two-stage, the last class head scores the encoder proposals: it is trained with
class-agnostic targets (every object is class 0), so only its row 0 is meaningful. Its 91 COCO
rows are therefore cut to the first 80 (as detrex's converter does), not mapped by category id,
which would drop row 0.
"""
import logging
import re
from typing import Dict, Mapping

import torch

from .coco_classes import COCO_ID_SLOTS
from .hf_deformable_detr import initial_box_pos_head
from .rename import adapt_class_rows, check_hidden_size

__all__ = ["finish_deformable_conversion", "has_refine_copies", "pop_indexed_heads"]

logger = logging.getLogger(__name__)

_HEAD_RE = re.compile(r"(class_embed|bbox_embed)\.(\d+)\.(.+)")
# Prefix of the per-layer box heads the decoder refines with; only box-refined models have it.
_REFINE_PREFIX = "transformer.decoder.bbox_embed."


def has_refine_copies(source_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a source checkpoint (official or detrex keys) was trained with box refinement."""
    return any(key.startswith(_REFINE_PREFIX) for key in source_state)


def _check_variant(state: Mapping, cfg, refine: bool, names: Mapping[str, str]) -> None:
    f = cfg.MODEL.DETR.DEFORMABLE
    two_stage = any(key.startswith("encoder_proposals.") for key in state)
    if two_stage != f.TWO_STAGE:
        found = (
            f"two-stage (it has {names['proposals']}, no {names['query']})"
            if two_stage
            else f"single-stage (it has {names['query']}, no {names['proposals']})"
        )
        raise ValueError(
            f"variant: the checkpoint is {found} but MODEL.DETR.DEFORMABLE.TWO_STAGE is "
            f"{f.TWO_STAGE}; set it {two_stage}"
        )
    if refine != f.WITH_BOX_REFINE:
        found = (
            f"box-refined (it has {_REFINE_PREFIX}*)"
            if refine
            else f"not box-refined (no {_REFINE_PREFIX}*, heads shared by all layers)"
        )
        raise ValueError(
            f"variant: the checkpoint is {found} but MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE is "
            f"{f.WITH_BOX_REFINE}; set it {refine}"
        )


def _check_sizes(state: Mapping[str, torch.Tensor], cfg) -> None:
    """Hidden size, levels, sampling points and queries against the config."""
    d, f = cfg.MODEL.DETR, cfg.MODEL.DETR.DEFORMABLE
    check_hidden_size(state, cfg, "input_proj.0.0.weight")
    level_embed = state.get("transformer.level_embed")
    if level_embed is not None and level_embed.shape[0] != f.NUM_FEATURE_LEVELS:
        raise ValueError(
            f"feature levels: transformer.level_embed has {level_embed.shape[0]} rows but "
            f"MODEL.DETR.DEFORMABLE.NUM_FEATURE_LEVELS={f.NUM_FEATURE_LEVELS}"
        )
    attention = (
        ("transformer.encoder.layers.0.self_attn", "ENC_N_POINTS", f.ENC_N_POINTS),
        ("transformer.decoder.layers.0.cross_attn", "DEC_N_POINTS", f.DEC_N_POINTS),
    )
    for module, config_key, points in attention:
        weight = state.get(f"{module}.attention_weights.weight")
        expected = d.NHEADS * f.NUM_FEATURE_LEVELS * points
        if weight is not None and weight.shape[0] != expected:
            raise ValueError(
                f"sampling points: {module}.attention_weights.weight has {weight.shape[0]} rows "
                f"(heads x levels x points) but the config gives {d.NHEADS} x "
                f"{f.NUM_FEATURE_LEVELS} x {points} = {expected} (MODEL.DETR.NHEADS, "
                f"MODEL.DETR.DEFORMABLE.NUM_FEATURE_LEVELS, MODEL.DETR.DEFORMABLE.{config_key})"
            )
    ffn = state.get("transformer.encoder.layers.0.ffn.linear1.weight")
    if ffn is not None and ffn.shape[0] != d.DIM_FEEDFORWARD:
        raise ValueError(
            f"FFN width: transformer.encoder.layers.0.ffn.linear1.weight is {tuple(ffn.shape)} "
            f"but MODEL.DETR.DIM_FEEDFORWARD={d.DIM_FEEDFORWARD} (detrex uses 2048, the official "
            "code 1024)"
        )
    queries = state.get("query_embed.weight")
    if queries is not None and queries.shape[0] != d.NUM_QUERIES:
        raise ValueError(
            f"queries: query_embed.weight has {queries.shape[0]} rows but "
            f"MODEL.DETR.NUM_QUERIES={d.NUM_QUERIES}"
        )


def pop_indexed_heads(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[int, Dict]]:
    """Remove the per-layer heads ``class_embed.i.*`` / ``bbox_embed.i.*`` from ``state``.

    Returns:
        dict: ``found[name][i][param]`` = tensor, for name "class_embed" / "bbox_embed".
    """
    found: Dict = {}
    for key in [k for k in state if _HEAD_RE.fullmatch(k)]:
        name, index, param = _HEAD_RE.fullmatch(key).groups()
        found.setdefault(name, {}).setdefault(int(index), {})[param] = state.pop(key)
    return found


def _assemble_heads(state: Dict[str, torch.Tensor], cfg, refine: bool) -> None:
    """Per-layer ``class_embed.i`` / ``bbox_embed.i`` -> kd_detr heads, in place."""
    two_stage = cfg.MODEL.DETR.DEFORMABLE.TWO_STAGE
    num_pred = cfg.MODEL.DETR.DEC_LAYERS + int(two_stage)
    found = pop_indexed_heads(state)
    for name in ("class_embed", "bbox_embed"):
        heads = found.get(name, {})
        if sorted(heads) != list(range(num_pred)):
            raise ValueError(
                f"heads: the checkpoint has {name}.{sorted(heads)} but the config needs "
                f"{name}.0-{num_pred - 1}: MODEL.DETR.DEC_LAYERS={cfg.MODEL.DETR.DEC_LAYERS}"
                + (" + the two-stage encoder head" if two_stage else "")
            )
        if refine:
            for index, params in heads.items():
                state.update({f"{name}.{index}.{p}": v for p, v in params.items()})
            continue
        first = heads[0]
        for index, params in heads.items():
            same = params.keys() == first.keys() and all(
                torch.equal(v, first[p]) for p, v in params.items()
            )
            if not same:
                raise ValueError(
                    f"heads: {name}.{index} differs from {name}.0, but a checkpoint without box "
                    "refinement shares one head across layers (was it trained with box "
                    "refinement? then set MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE True)"
                )
        state.update({f"{name}.{p}": v for p, v in first.items()})


def _adapt_proposal_head(state: Dict, key: str, expected: int, coco_classes: str) -> None:
    """Rows of the two-stage encoder-proposal class head (see the module docstring)."""
    rows = state[key].shape[0]
    if coco_classes != "keep" and rows == COCO_ID_SLOTS and expected == 80:
        state[key] = state[key][:expected]
    elif rows != expected:
        raise ValueError(
            f"class count: {key} (the two-stage proposal head) has {rows} rows but the model "
            f"expects {expected} (MODEL.DETR.NUM_CLASSES={expected})"
        )


def finish_deformable_conversion(
    state: Dict[str, torch.Tensor],
    cfg,
    coco_classes: str,
    refine: bool,
    names: Mapping[str, str],
) -> Dict[str, torch.Tensor]:
    """Checks, heads, class rows and ``box_pos_head`` of a renamed Deformable DETR state dict.

    Args:
        state: the source weights with kd_detr names; heads still per layer (``class_embed.i``).
        cfg: the target DeformableDETR config.
        coco_classes: "auto", "map" or "keep" (see :func:`.rename.adapt_class_rows`).
        refine: whether the source checkpoint was box-refined (:func:`has_refine_copies`).
        names: the source's names of the learned queries ("query") and of the two-stage
            proposal layer ("proposals"), for error messages.

    Returns:
        dict[str, Tensor]: ``state``, completed, with exactly the keys of the model of ``cfg``.

    Raises:
        ValueError: naming the key and the config key for a variant, size or class mismatch.
    """
    _check_variant(state, cfg, refine, names)
    _check_sizes(state, cfg)
    _assemble_heads(state, cfg, refine)
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    hint = f"MODEL.DETR.NUM_CLASSES={num_classes}"
    dec_layers = cfg.MODEL.DETR.DEC_LAYERS
    prefixes = [f"class_embed.{i}." for i in range(dec_layers)] if refine else ["class_embed."]
    for prefix in prefixes:
        for param in ("weight", "bias"):
            adapt_class_rows(state, prefix + param, num_classes, False, coco_classes, hint)
    if refine and cfg.MODEL.DETR.DEFORMABLE.TWO_STAGE:
        for param in ("weight", "bias"):
            key = f"class_embed.{dec_layers}.{param}"
            _adapt_proposal_head(state, key, num_classes, coco_classes)
    if not cfg.MODEL.DETR.DEFORMABLE.TWO_STAGE:
        state.update(initial_box_pos_head(cfg.MODEL.DETR.HIDDEN_DIM))
        logger.info("Added box_pos_head (extra query groups only) with its initial weights")
    return state
