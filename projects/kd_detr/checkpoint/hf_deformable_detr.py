# Copyright (c) kd_detr contributors.
"""Hugging Face ``DeformableDetrForObjectDetection`` weights -> kd_detr ``DeformableDETR`` keys.

Supported: sine position embeddings, no dilation, a ResNet backbone (timm's, the Hugging Face
default and the SenseTime/deformable-detr* checkpoints, or transformers' own), with or without
box refinement and two-stage. Both the on-disk layout of ``save_pretrained`` (``out_proj``,
``fc1``) and the in-memory one of transformers >= 5 (``o_proj``, ``mlp.fc1``) are accepted.

Heads: Hugging Face ties the per-layer heads it does not need separately and ``save_pretrained``
writes each tied group once (``class_embed.0`` for all layers; with box refinement the box heads
live in ``model.decoder.bbox_embed``, with two-stage also the class heads). kd_detr keeps one
shared class / box head without box refinement and one per layer (+ the encoder's) with it; a
head missing from the file is taken from its tie source, index 0.

Single-stage kd_detr models also have ``box_pos_head``, which turns the boxes of extra query
groups (distillation points) into positional queries and has no Hugging Face counterpart: the
converter adds it with PyTorch's default Linear initialisation from a fixed seed (see
:func:`initial_box_pos_head`), as a model trained without query groups would have it.
"""
import logging
import re
from typing import Dict, List, Mapping

import torch

from ..modeling.transformer import MLP
from .hf_common import (
    CANONICAL_RENAMES,
    add_backbone,
    apply_rules,
    config_mismatches,
    split_backbone,
    transformer_config_pairs,
)
from .registry import register_hf_converter

__all__ = [
    "convert_hf_deformable_detr",
    "hf_deformable_detr_config_mismatches",
    "initial_box_pos_head",
]

logger = logging.getLogger(__name__)

_MODEL = [
    (r"^model\.input_proj\.(\d+)\.([01])\.", r"input_proj.\1.\2."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.reference_points\.", "reference_points."),
    (r"^model\.(enc_output|enc_output_norm)\.", r"encoder_proposals.\1."),
    (r"^model\.(pos_trans|pos_trans_norm)\.", r"proposal_query.\1."),
]
_LAYER = {
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
    "decoder": {
        "self_attn_layer_norm": "norm1",
        "encoder_attn": "cross_attn",
        "encoder_attn_layer_norm": "norm2",
        "final_layer_norm": "norm3",
    },
}
_LAYER_RE = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$")
_HEAD_RE = re.compile(r"^(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")


def initial_box_pos_head(d_model: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``box_pos_head.*`` weights (MLP 2d -> d -> d) with PyTorch's default initialisation
    drawn from ``seed``, without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = MLP(2 * d_model, d_model, d_model, 2)
    return {f"box_pos_head.{k}": v.detach() for k, v in head.state_dict().items()}


def _layer_key(key):
    match = _LAYER_RE.match(key)
    if match is None:
        return None
    part, index, module, rest = match.groups()
    if module in ("fc1", "fc2"):
        module, rest = "ffn", f"linear{module[-1]}.{rest}"
    elif module in _LAYER[part]:
        module = _LAYER[part][module]
    elif module not in ("self_attn", "encoder_attn"):
        return None
    return f"transformer.{part}.layers.{index}.{module}.{rest}"


def _heads(found: Dict, refine: bool, num_pred: int) -> Dict[str, torch.Tensor]:
    """kd_detr head keys from ``found[(name, index)] = {param: tensor}``."""
    converted = {}
    for name in ("class_embed", "bbox_embed"):
        if (name, 0) not in found:
            raise ValueError(f"Hugging Face Deformable DETR weights have no {name}.0 head")
        if not refine:
            for (n, i), params in found.items():
                same = all(torch.equal(v, found[(n, 0)][k]) for k, v in params.items())
                if n == name and not same:
                    raise ValueError(
                        f"{name}.{i} differs from {name}.0, but without box refinement the "
                        "heads are shared (set MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE True?)"
                    )
            converted.update({f"{name}.{k}": v for k, v in found[(name, 0)].items()})
            continue
        for i in range(num_pred):
            params = found.get((name, i), found[(name, 0)])
            converted.update({f"{name}.{i}.{k}": v for k, v in params.items()})
    return converted


def convert_hf_deformable_detr(
    hf_state_dict: Mapping[str, torch.Tensor], hf_config: Mapping
) -> Dict[str, torch.Tensor]:
    """Rename a ``DeformableDetrForObjectDetection`` state dict to kd_detr ``DeformableDETR``.

    Args:
        hf_state_dict: Hugging Face weights (either key layout).
        hf_config: the model's ``config.json`` as a dict.

    Returns:
        dict[str, Tensor]: kd_detr state dict (``num_batches_tracked`` buffers are dropped).

    Raises:
        ValueError: listing every key that no rule converts, or for untied shared heads.
    """
    if hf_config.get("model_type") != "deformable_detr":
        raise ValueError(
            "convert_hf_deformable_detr expects model_type 'deformable_detr', got "
            f"{hf_config.get('model_type')!r}"
        )
    refine, two_stage = hf_config.get("with_box_refine"), hf_config.get("two_stage")
    num_pred = hf_config.get("decoder_layers", 6) + (1 if two_stage else 0)
    heads, converted, unconverted = {}, {}, []
    backbone, rest = split_backbone(hf_state_dict, CANONICAL_RENAMES)
    for key, canonical, value in rest:
        head = _HEAD_RE.match(canonical)
        if head:  # the decoder's copy wins over a tied top-level one
            name, index, param = head.groups()
            slot = heads.setdefault((name, int(index)), {})
            if canonical.startswith("model.decoder.") or param not in slot:
                slot[param] = value
            continue
        new = _layer_key(canonical) or apply_rules(_MODEL, canonical)
        if new is None:
            unconverted.append(key)
        else:
            converted[new] = value
    hf_backbone = (hf_config.get("backbone_config") or {}).get("model_type")
    kind = "resnet" if hf_backbone == "resnet" else "timm_backbone"
    add_backbone(converted, unconverted, backbone, kind, "Deformable DETR")
    converted.update(_heads(heads, bool(refine), num_pred))
    if not two_stage:
        converted.update(initial_box_pos_head(hf_config.get("d_model", 256)))
        logger.info("Added box_pos_head (extra query groups only) with its initial weights")
    return converted


def _hf_in_features(hf_config: Mapping) -> List[str]:
    """Detectron2 names (res2..res5) of the Hugging Face backbone's output stages."""
    bb = hf_config.get("backbone_config") or {}
    if bb.get("model_type") == "resnet":  # stage1..stage4 = res2..res5
        return [f"res{int(name[-1]) + 1}" for name in bb.get("out_features") or []]
    return [f"res{i + 1}" for i in bb.get("out_indices") or []]  # timm layer1..4 at 1..4


def hf_deformable_detr_config_mismatches(hf_config: Mapping, cfg) -> List[str]:
    """Differences between a Hugging Face Deformable DETR ``config.json`` and a kd_detr config.

    Returns:
        list[str]: one readable line per mismatch (empty when the configs agree).
    """
    d = cfg.MODEL.DETR
    f = d.DEFORMABLE
    pairs = transformer_config_pairs(cfg, "d_model") + [
        ("num_feature_levels", "MODEL.DETR.DEFORMABLE.NUM_FEATURE_LEVELS", f.NUM_FEATURE_LEVELS),
        ("encoder_n_points", "MODEL.DETR.DEFORMABLE.ENC_N_POINTS", f.ENC_N_POINTS),
        ("decoder_n_points", "MODEL.DETR.DEFORMABLE.DEC_N_POINTS", f.DEC_N_POINTS),
        ("with_box_refine", "MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", f.WITH_BOX_REFINE),
        ("two_stage", "MODEL.DETR.DEFORMABLE.TWO_STAGE", f.TWO_STAGE),
    ]
    if f.TWO_STAGE:
        pairs.append(("two_stage_num_proposals", "MODEL.DETR.NUM_QUERIES", d.NUM_QUERIES))
    hf_features = _hf_in_features(hf_config)
    checks = [
        (
            cfg.MODEL.META_ARCHITECTURE == "DeformableDETR",
            "MODEL.META_ARCHITECTURE must be 'DeformableDETR'",
        ),
        (d.USE_FOCAL_LOSS, "Deformable DETR has C sigmoid logits: USE_FOCAL_LOSS must be True"),
        (
            hf_features == list(f.IN_FEATURES),
            f"backbone outputs {hf_features} but MODEL.DETR.DEFORMABLE.IN_FEATURES="
            f"{list(f.IN_FEATURES)}",
        ),
        (
            hf_config.get("position_embedding_type", "sine") == "sine",
            "only sine position embeddings are supported",
        ),
        (not hf_config.get("dilation", False), "dilated (DC5) backbones are not supported"),
    ]
    return config_mismatches(hf_config, cfg, pairs, checks)


register_hf_converter("deformable_detr", hf_deformable_detr_config_mismatches)(
    convert_hf_deformable_detr
)
