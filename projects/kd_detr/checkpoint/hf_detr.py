# Copyright (c) kd_detr contributors.
"""Hugging Face ``transformers`` DETR (``DetrForObjectDetection``) -> kd_detr ``DETR`` weights.

Supported: sine position embeddings, no dilation, and a ResNet backbone that is either timm's
(``use_timm_backbone``, the facebook/detr-* checkpoints) or transformers' own ``ResNet``. Both the
on-disk key layout written by ``save_pretrained`` (``backbone.conv_encoder``, ``out_proj``,
``fc1``) and the in-memory one of transformers >= 5 (``backbone.model``, ``o_proj``,
``mlp.fc1``) are accepted.
"""
import json
import logging
import os
import re
from typing import Dict, List, Mapping, Tuple

import torch

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
    "convert_hf_detr",
    "check_state_dict_keys",
    "hf_detr_config_mismatches",
    "read_hf_folder",
]

logger = logging.getLogger(__name__)

_ENC_LAYER = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
_DEC_LAYER = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "encoder_attn": "cross_attn",
}
_HEADS = [
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.layers\.(\d)\.", r"bbox_embed.layers.\1."),
]


def _transformer_key(key):
    m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
    if m is None:
        return None
    part, index, module, rest = m.groups()
    table = _ENC_LAYER if part == "encoder" else _DEC_LAYER
    if module in ("fc1", "fc2"):
        module, rest = "ffn", f"linear{module[-1]}.{rest}"
    elif module in table:
        module = table[module]
    elif module != "self_attn":
        return None
    return f"transformer.{part}.layers.{index}.{module}.{rest}"


def _backbone_kind(hf_config):
    bb = hf_config.get("backbone_config") or {}
    kind = bb.get("model_type", "timm_backbone" if hf_config.get("use_timm_backbone") else None)
    if kind not in ("timm_backbone", "resnet"):
        raise ValueError(
            f"Unsupported Hugging Face DETR backbone type {kind!r} (expected timm or HF ResNet)"
        )
    return kind


def convert_hf_detr(hf_state_dict: Mapping[str, torch.Tensor], hf_config: Mapping) -> Dict:
    """Rename a ``DetrForObjectDetection`` state dict to kd_detr ``DETR`` keys.

    Args:
        hf_state_dict: the Hugging Face weights (any of the two key layouts).
        hf_config: the model's ``config.json`` as a dict.

    Returns:
        dict[str, Tensor]: kd_detr state dict (``num_batches_tracked`` buffers are dropped).

    Raises:
        ValueError: listing every Hugging Face key that no rule converts.
    """
    model_type = hf_config.get("model_type")
    if model_type != "detr":
        raise ValueError(f"convert_hf_detr expects model_type 'detr', got {model_type!r}")
    kind = _backbone_kind(hf_config)
    converted, unconverted = {}, []
    backbone, rest = split_backbone(hf_state_dict, CANONICAL_RENAMES)
    for key, canonical, value in rest:
        new = _transformer_key(canonical) or apply_rules(_HEADS, canonical)
        if new is None:
            unconverted.append(key)
        else:
            converted[new] = value
    add_backbone(converted, unconverted, backbone, kind, "DETR", require_backbone=False)
    return converted


def check_state_dict_keys(converted: Mapping[str, torch.Tensor], model_state: Mapping) -> None:
    """Raise ValueError listing missing, unexpected and wrongly shaped keys versus ``model_state``
    (e.g. ``model.state_dict()``); does nothing when the two match exactly."""
    missing = sorted(set(model_state) - set(converted))
    unexpected = sorted(set(converted) - set(model_state))
    shapes = sorted(
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in set(converted) & set(model_state)
        if tuple(converted[k].shape) != tuple(model_state[k].shape)
    )
    problems = [
        f"{name} ({len(keys)}): {keys}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    if problems:
        raise ValueError("Converted checkpoint does not match the model: " + "; ".join(problems))


def hf_detr_config_mismatches(hf_config: Mapping, cfg) -> List[str]:
    """Differences between a Hugging Face DETR ``config.json`` and a kd_detr config.

    Returns:
        list[str]: one readable line per mismatch (empty when the configs agree).
    """
    d = cfg.MODEL.DETR
    checks = [
        (cfg.MODEL.META_ARCHITECTURE == "DETR", "MODEL.META_ARCHITECTURE must be 'DETR'"),
        (not d.PRE_NORM, "Hugging Face DETR is post-norm but MODEL.DETR.PRE_NORM is True"),
        (not d.USE_FOCAL_LOSS, "Hugging Face DETR has C + 1 softmax logits: USE_FOCAL_LOSS False"),
        (
            hf_config.get("position_embedding_type", "sine") == "sine",
            "only sine position embeddings are supported",
        ),
        (not hf_config.get("dilation", False), "dilated (DC5) backbones are not supported"),
    ]
    return config_mismatches(hf_config, cfg, transformer_config_pairs(cfg, "d_model"), checks)


def read_hf_folder(path: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Load ``config.json`` and the weights (safetensors or .bin, sharded or not) of a folder
    written by ``save_pretrained``; returns (state_dict, config)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: INPUT must be a save_pretrained folder")
    with open(config_path) as f:
        config = json.load(f)
    state_dict = {}
    loaders = (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin))
    for name, loader in loaders:
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            for shard in shards:
                state_dict.update(loader(os.path.join(path, shard)))
            return state_dict, config
        if os.path.isfile(os.path.join(path, name)):
            return loader(os.path.join(path, name)), config
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or index) in {path}")


def _load_safetensors(file):
    from safetensors.torch import load_file

    return load_file(file)


def _load_bin(file):
    return torch.load(file, map_location="cpu", weights_only=True)


register_hf_converter("detr", hf_detr_config_mismatches)(convert_hf_detr)
