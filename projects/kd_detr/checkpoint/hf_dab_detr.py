# Copyright (c) kd_detr contributors.
"""Hugging Face ``DabDetrForObjectDetection`` weights -> kd_detr ``DABDETR`` keys.

Supported backbones: timm's ResNet (``use_timm_backbone``, the Hugging Face default and the
IDEA-Research/dab-detr-* checkpoints) and transformers' own ``ResNet``, renamed as for DETR
(:mod:`.hf_common`). Hugging Face ties ``model.decoder.bbox_embed`` to ``bbox_predictor`` (only the
latter is written by ``save_pretrained``); kd_detr keeps one head, ``bbox_embed``, so the decoder
copy is dropped after checking that it equals the predictor.

Hugging Face clamps ``inverse_sigmoid`` at 1e-5, the official DAB-DETR code at 1e-3
(``MODEL.DETR.DAB.INVERSE_SIGMOID_EPS``); the two only differ for box coordinates within 1e-3 of
0 or 1.
"""
import re
from typing import Dict, List, Mapping, Optional

import torch

from .hf_common import add_backbone, config_mismatches, split_backbone, transformer_config_pairs
from .registry import register_hf_converter

__all__ = ["convert_hf_dab_detr", "hf_dab_detr_config_mismatches"]

_TIMM = "_backbone."  # transformers' TimmBackbone wraps the timm model in ``_backbone``

# (pattern, replacement) applied with re.fullmatch to keys outside the backbone and the layers.
_RULES = [
    (r"model\.input_projection\.(.+)", r"input_proj.\1"),
    (r"model\.query_refpoint_embeddings\.weight", r"refpoint_embed.weight"),
    (r"model\.patterns\.weight", r"patterns.weight"),
    (r"class_embed\.(.+)", r"class_embed.\1"),
    (r"bbox_predictor\.(.+)", r"bbox_embed.\1"),
    (r"model\.encoder\.query_scale\.(.+)", r"transformer.encoder_query_scale.\1"),
    (r"model\.decoder\.layernorm\.(.+)", r"transformer.decoder.norm.\1"),
    (
        r"model\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.(.+)",
        r"transformer.decoder.\1.\2",
    ),
]
# Layer submodules: Hugging Face name -> kd_detr name, under transformer.encoder_layers.N or
# transformer.decoder.layers.N.
_ENCODER_LAYER = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "fc1": "ffn.linear1",
    "fc2": "ffn.linear2",
    "activation_fn": "ffn.activation",
    "final_layer_norm": "norm2",
}
_DECODER_LAYER = {
    "self_attn.self_attn_query_content_proj": "sa_qcontent_proj",
    "self_attn.self_attn_query_pos_proj": "sa_qpos_proj",
    "self_attn.self_attn_key_content_proj": "sa_kcontent_proj",
    "self_attn.self_attn_key_pos_proj": "sa_kpos_proj",
    "self_attn.self_attn_value_proj": "sa_v_proj",
    "self_attn.self_attn.output_proj": "self_attn_out_proj",
    "self_attn.self_attn_layer_norm": "norm1",
    "cross_attn.cross_attn_query_content_proj": "ca_qcontent_proj",
    "cross_attn.cross_attn_query_pos_proj": "ca_qpos_proj",
    "cross_attn.cross_attn_key_content_proj": "ca_kcontent_proj",
    "cross_attn.cross_attn_key_pos_proj": "ca_kpos_proj",
    "cross_attn.cross_attn_value_proj": "ca_v_proj",
    "cross_attn.cross_attn_query_pos_sine_proj": "ca_qpos_sine_proj",
    "cross_attn.cross_attn.output_proj": "cross_attn_out_proj",
    "cross_attn.cross_attn_layer_norm": "norm2",
    "mlp.fc1": "ffn.linear1",
    "mlp.fc2": "ffn.linear2",
    "mlp.activation_fn": "ffn.activation",
    "mlp.final_layer_norm": "norm3",
}
_LAYER_RE = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(\w+)")
_LAYER_TABLES = {
    "encoder": ("transformer.encoder_layers", _ENCODER_LAYER),
    "decoder": ("transformer.decoder.layers", _DECODER_LAYER),
}


def _rename(key: str):
    """kd_detr name of a non-backbone Hugging Face key, or None when unknown."""
    for pattern, replacement in _RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    match = _LAYER_RE.fullmatch(key)
    if match:
        part, layer, module, param = match.groups()
        prefix, table = _LAYER_TABLES[part]
        if module in table:
            return f"{prefix}.{layer}.{table[module]}.{param}"
    return None


def convert_hf_dab_detr(
    hf_state_dict: Mapping[str, torch.Tensor], hf_config: Optional[Mapping] = None
) -> Dict[str, torch.Tensor]:
    """Rename a ``DabDetrForObjectDetection`` state dict to kd_detr ``DABDETR`` keys.

    Args:
        hf_state_dict: Hugging Face weights (``model.*``, ``class_embed.*``, ``bbox_predictor.*``),
            as in memory or as written by ``save_pretrained``.
        hf_config: the model's ``config.json`` as a dict (optional; only its model type is
            checked; the backbone kind is read from the keys).

    Returns:
        dict[str, Tensor]: kd_detr state dict (``num_batches_tracked`` buffers are dropped).

    Raises:
        ValueError: listing every key that no rule converts (e.g. a pre-norm encoder's final
            LayerNorm), or when the tied box heads differ.
    """
    if hf_config is not None and hf_config.get("model_type") != "dab-detr":
        raise ValueError(
            "convert_hf_dab_detr expects model_type 'dab-detr', got "
            f"{hf_config.get('model_type')!r}"
        )
    converted, unconverted = {}, []
    backbone, rest = split_backbone(hf_state_dict)
    for key, _, value in rest:
        if key.startswith("model.decoder.bbox_embed."):
            tied = "bbox_predictor." + key[len("model.decoder.bbox_embed.") :]
            if tied in hf_state_dict and not torch.equal(hf_state_dict[tied], value):
                raise ValueError(f"{key} differs from {tied}; untied box heads are not supported")
        else:
            new_key = _rename(key)
            if new_key is None:
                unconverted.append(key)
            else:
                converted[new_key] = value
    timm = bool(backbone) and all(k.startswith(_TIMM) for k in backbone)
    if timm:
        backbone = {k[len(_TIMM) :]: v for k, v in backbone.items()}
    add_backbone(converted, unconverted, backbone, "timm_backbone" if timm else "resnet", "DabDetr")
    return converted


def hf_dab_detr_config_mismatches(hf_config: Mapping, cfg) -> List[str]:
    """Differences between a Hugging Face DAB-DETR ``config.json`` and a kd_detr config.

    Returns:
        list[str]: one readable line per mismatch (empty when the configs agree).
    """
    d = cfg.MODEL.DETR
    pairs = transformer_config_pairs(cfg, "hidden_size") + [
        ("num_patterns", "MODEL.DETR.DAB.NUM_PATTERNS", d.DAB.NUM_PATTERNS),
        ("keep_query_pos", "MODEL.DETR.DAB.KEEP_QUERY_POS", d.DAB.KEEP_QUERY_POS),
        ("temperature_height", "MODEL.DETR.DAB.TEMPERATURE", d.DAB.TEMPERATURE),
        ("temperature_width", "MODEL.DETR.DAB.TEMPERATURE", d.DAB.TEMPERATURE),
    ]
    checks = [
        (cfg.MODEL.META_ARCHITECTURE == "DABDETR", "MODEL.META_ARCHITECTURE must be 'DABDETR'"),
        (d.USE_FOCAL_LOSS, "DAB-DETR has C sigmoid logits: MODEL.DETR.USE_FOCAL_LOSS must be True"),
        (d.DAB.MODULATE_HW_ATTN, "Hugging Face DAB-DETR modulates attention by width/height"),
        (not d.DAB.BBOX_EMBED_DIFF_EACH_LAYER, "Hugging Face DAB-DETR shares one box head"),
        (not hf_config.get("normalize_before", False), "pre-norm (normalize_before) unsupported"),
        (hf_config.get("query_dim", 4) == 4, "only query_dim 4 is supported"),
        (
            hf_config.get("sine_position_embedding_scale") is None,
            "only the default sine position embedding scale (2 pi) is supported",
        ),
        (not hf_config.get("dilation", False), "dilated (DC5) backbones are not supported"),
    ]
    return config_mismatches(hf_config, cfg, pairs, checks)


register_hf_converter("dab-detr", hf_dab_detr_config_mismatches)(convert_hf_dab_detr)
