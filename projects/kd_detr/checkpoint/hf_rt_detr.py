# Copyright (c) kd_detr contributors.
"""Hugging Face ``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection`` weights -> kd_detr
``RTDETR`` keys, and the check of their ``config.json`` against a kd_detr config.

Supported: transformers' own ResNet-vd backbone (``rt_detr_resnet``, every PekingU/rtdetr*
checkpoint). Both key layouts are accepted (``o_proj`` / ``out_proj``, ``mlp.fc1`` / ``fc1``,
``model.backbone.model.`` / ``model.backbone.conv_encoder.model.``). RT-DETRv2 keeps a second,
tied copy of the heads at the top level (``class_embed.*``, ``bbox_embed.*``); the decoder's copy
is used. v2's ``n_points_scale`` buffer is derived from the config and dropped. Hugging Face
freezes the backbone's BatchNorm (no ``num_batches_tracked``); for a kd_detr config that trains
it (``MODEL.RESNET_VD.NORM`` "BN", the R18vd / R34vd recipes) zero counters are added.
"""
import re
from typing import Dict, List, Mapping

import torch

from .hf_backbones import BACKBONE_PREFIXES, hf_resnet_vd_key
from .hf_common import apply_rules
from .registry import register_hf_converter

__all__ = [
    "convert_hf_rt_detr",
    "family_mismatches",
    "hf_rt_detr_config_mismatches",
    "rename_rt_detr_family",
]

_LAYER_PARTS = [
    (r"\.o_proj\.", ".out_proj."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.(?:mlp\.)?fc(\d)\.", r".ffn.linear\1."),
    (r"\.mlp\.layers\.(\d)\.", lambda m: f".ffn.linear{int(m[1]) + 1}."),  # D-FINE's MLP
]
_MODEL = [
    (r"^model\.encoder_input_proj\.", "input_proj."),
    (r"^model\.encoder\.(?:encoder|aifi)\.", "encoder.aifi."),
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.denoising_class_embed\.", "denoising.label_enc."),
    (r"^model\.weight_embedding\.", "tgt_embed."),
    (r"^model\.(enc_output|enc_score_head|enc_bbox_head|decoder_input_proj)\.", r"\1."),
    (r"^model\.decoder\.(query_pos_head|pre_bbox_head|lqe_layers)\.", r"transformer.\1."),
    (r"^model\.decoder\.(reg_scale|up)$", r"transformer.\1"),
    (r"^model\.decoder\.layers\.", "transformer.layers."),
    (r"^model\.decoder\.(class_embed|bbox_embed)\.", r"\1."),
]


def _rename_layer_parts(key: str, is_decoder: bool) -> str:
    for pattern, repl in _LAYER_PARTS:
        key = re.sub(pattern, repl, key)
    # the encoder's second norm follows the FFN (norm2), the decoder's is the third one (norm3)
    return key.replace(".final_layer_norm.", ".norm3." if is_decoder else ".norm2.")


def convert_hf_rt_detr(
    hf_state_dict: Mapping[str, torch.Tensor], hf_config: Mapping, cfg=None
) -> Dict[str, torch.Tensor]:
    """Rename an RT-DETR / RT-DETRv2 state dict to kd_detr ``RTDETR`` keys.

    Args:
        hf_state_dict, hf_config: the Hugging Face weights and ``config.json``.
        cfg: the kd_detr config (optional): with a trainable-BatchNorm backbone, zero
            ``num_batches_tracked`` counters are added for its norms.

    Raises:
        ValueError: listing every key that no rule converts.
    """
    if hf_config.get("model_type") not in ("rt_detr", "rt_detr_v2"):
        raise ValueError(
            "convert_hf_rt_detr expects model_type 'rt_detr' or 'rt_detr_v2', got "
            f"{hf_config.get('model_type')!r}"
        )
    norm = cfg.MODEL.RESNET_VD.NORM if cfg is not None else "FrozenBN"
    return rename_rt_detr_family(hf_state_dict, hf_resnet_vd_key, norm, "RT-DETR")


def rename_rt_detr_family(
    hf_state_dict: Mapping[str, torch.Tensor], backbone_key, backbone_norm: str, model_name: str
) -> Dict[str, torch.Tensor]:
    """Rename the weights of an RT-DETR-family model (RT-DETR, RT-DETRv2, D-FINE).

    Args:
        hf_state_dict: the Hugging Face weights.
        backbone_key: renames a backbone key (prefix stripped), None for unknown keys.
        backbone_norm: the kd_detr backbone's norm; unless "FrozenBN" zero
            ``num_batches_tracked`` counters are added (Hugging Face freezes the backbone BN).
        model_name: how errors name the model.

    Raises:
        ValueError: listing every key that no rule converts.
    """
    converted, unconverted, top_level = {}, [], {}
    for key, value in hf_state_dict.items():
        prefix = next((p for p in BACKBONE_PREFIXES if key.startswith(p)), None)
        if key.endswith("points_scale") or (prefix and key.endswith("num_batches_tracked")):
            continue
        if prefix is not None:
            new = backbone_key(key[len(prefix) :])
            new = None if new is None else "backbone." + new
        elif re.match(r"^(class_embed|bbox_embed)\.", key):  # v2 / D-FINE's tied top copy
            top_level[key] = value
            continue
        else:
            new = apply_rules(_MODEL, key)
            if new is not None and (new.startswith("transformer.layers.") or ".aifi." in new):
                new = _rename_layer_parts(new, new.startswith("transformer."))
        if new is None:
            unconverted.append(key)
        else:
            converted[new] = value
    for key, value in top_level.items():  # only when the decoder copy is absent
        converted.setdefault(key, value)
    if not any(k.startswith("backbone.") for k in converted):
        unconverted.append("(no backbone keys under model.backbone.model.)")
    if backbone_norm != "FrozenBN":
        norms = [k[: -len("running_mean")] for k in converted if k.endswith(".running_mean")]
        zero = torch.zeros((), dtype=torch.long)
        norms = [k for k in norms if k.startswith("backbone.")]
        converted.update({k + "num_batches_tracked": zero for k in norms})
    if unconverted:
        raise ValueError(
            f"{len(unconverted)} Hugging Face {model_name} keys were not converted (unsupported "
            f"model parts?): {sorted(unconverted)}"
        )
    return converted


_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
}


def _backbone_problems(hf_config: Mapping, cfg) -> List[str]:
    bb = hf_config.get("backbone_config") or {}
    if bb.get("model_type") != "rt_detr_resnet":
        return [f"unsupported backbone {bb.get('model_type')!r} (expected rt_detr_resnet)"]
    problems = []
    depth = _DEPTHS.get((bb.get("layer_type"), tuple(bb.get("depths", ()))))
    if depth is None:
        problems.append(f"unsupported ResNet-vd {bb.get('layer_type')} {bb.get('depths')}")
    elif depth != cfg.MODEL.RESNET_VD.DEPTH:
        problems.append(
            f"backbone is ResNet-{depth}vd but MODEL.RESNET_VD.DEPTH={cfg.MODEL.RESNET_VD.DEPTH}"
        )
    if bb.get("embedding_size", 64) != cfg.MODEL.RESNET_VD.STEM_CHANNELS:
        problems.append(
            f"embedding_size={bb.get('embedding_size')} but MODEL.RESNET_VD.STEM_CHANNELS="
            f"{cfg.MODEL.RESNET_VD.STEM_CHANNELS}"
        )
    if bb.get("downsample_in_bottleneck") or bb.get("downsample_in_first_stage"):
        problems.append("only ResNet-vd with the stride on the 3x3 conv is supported")
    features = [f"res{i + 1}" for i in bb.get("out_indices") or []]  # stage_i = res{i+1}
    if features != list(cfg.MODEL.RTDETR.IN_FEATURES):
        problems.append(
            f"backbone outputs {features} but MODEL.RTDETR.IN_FEATURES="
            f"{list(cfg.MODEL.RTDETR.IN_FEATURES)}"
        )
    return problems


def hf_rt_detr_config_mismatches(hf_config: Mapping, cfg) -> List[str]:
    """Differences between a Hugging Face RT-DETR(v2) ``config.json`` and a kd_detr config.

    Returns:
        list[str]: one readable line per mismatch (empty when the configs agree).
    """
    r = cfg.MODEL.RTDETR
    v2 = hf_config.get("model_type") == "rt_detr_v2"
    problems = family_mismatches(hf_config, cfg, "RTDETR", v2)
    if r.VERSION != (2 if v2 else 1):
        problems.append(
            f"model_type {hf_config.get('model_type')!r} but MODEL.RTDETR.VERSION={r.VERSION}"
        )
    return problems + _backbone_problems(hf_config, cfg)


def family_mismatches(hf_config: Mapping, cfg, meta_arch: str, sampling: bool) -> List[str]:
    """Mismatches of the settings RT-DETR, RT-DETRv2 and D-FINE share (sizes, sampling points,
    denoising, losses, matcher, classes); ``sampling``: also compare v2's decoder_offset_scale
    and decoder_method."""
    d, r = cfg.MODEL.DETR, cfg.MODEL.RTDETR
    points = list(r.DEC_N_POINTS)
    points = points * r.NUM_FEATURE_LEVELS if len(points) == 1 else points
    dn = d.DN.NUM_QUERIES if d.DN.ENABLED else 0
    pairs = [
        ("d_model", "MODEL.DETR.HIDDEN_DIM", d.HIDDEN_DIM),
        ("num_queries", "MODEL.DETR.NUM_QUERIES", d.NUM_QUERIES),
        ("decoder_layers", "MODEL.DETR.DEC_LAYERS", d.DEC_LAYERS),
        ("decoder_attention_heads", "MODEL.DETR.NHEADS", d.NHEADS),
        ("decoder_ffn_dim", "MODEL.DETR.DIM_FEEDFORWARD", d.DIM_FEEDFORWARD),
        ("decoder_activation_function", "MODEL.DETR.ACTIVATION", d.ACTIVATION),
        ("encoder_hidden_dim", "MODEL.RTDETR.ENCODER_HIDDEN_DIM", r.ENCODER_HIDDEN_DIM),
        ("encoder_layers", "MODEL.RTDETR.ENCODER_LAYERS", r.ENCODER_LAYERS),
        ("encoder_attention_heads", "MODEL.RTDETR.ENCODER_NHEADS", r.ENCODER_NHEADS),
        ("encoder_ffn_dim", "MODEL.RTDETR.ENCODER_FFN_DIM", r.ENCODER_FFN_DIM),
        ("encoder_activation_function", "MODEL.RTDETR.ENCODER_ACTIVATION", r.ENCODER_ACTIVATION),
        ("normalize_before", "MODEL.RTDETR.ENCODER_PRE_NORM", r.ENCODER_PRE_NORM),
        ("encode_proj_layers", "MODEL.RTDETR.ENCODE_LEVELS", list(r.ENCODE_LEVELS)),
        ("activation_function", "MODEL.RTDETR.CCFF_ACTIVATION", r.CCFF_ACTIVATION),
        ("hidden_expansion", "MODEL.RTDETR.HIDDEN_EXPANSION", r.HIDDEN_EXPANSION),
        ("num_feature_levels", "MODEL.RTDETR.NUM_FEATURE_LEVELS", r.NUM_FEATURE_LEVELS),
        ("learn_initial_query", "MODEL.RTDETR.LEARN_INITIAL_QUERY", r.LEARN_INITIAL_QUERY),
        ("num_denoising", "MODEL.DETR.DN.NUM_QUERIES (0 when DN.ENABLED is False)", dn),
        ("box_noise_scale", "MODEL.DETR.DN.BOX_NOISE_SCALE", d.DN.BOX_NOISE_SCALE),
        ("focal_loss_alpha", "MODEL.DETR.FOCAL_ALPHA", d.FOCAL_ALPHA),
        ("focal_loss_gamma", "MODEL.DETR.FOCAL_GAMMA", d.FOCAL_GAMMA),
        ("weight_loss_vfl", "MODEL.DETR.CLASS_WEIGHT", d.CLASS_WEIGHT),
        ("weight_loss_bbox", "MODEL.DETR.BBOX_WEIGHT", d.BBOX_WEIGHT),
        ("weight_loss_giou", "MODEL.DETR.GIOU_WEIGHT", d.GIOU_WEIGHT),
        ("matcher_class_cost", "MODEL.DETR.COST_CLASS", d.COST_CLASS),
        ("matcher_bbox_cost", "MODEL.DETR.COST_BBOX", d.COST_BBOX),
        ("matcher_giou_cost", "MODEL.DETR.COST_GIOU", d.COST_GIOU),
        ("matcher_alpha", "MODEL.RTDETR.MATCHER_ALPHA", r.MATCHER_ALPHA),
        ("matcher_gamma", "MODEL.RTDETR.MATCHER_GAMMA", r.MATCHER_GAMMA),
        ("auxiliary_loss", "MODEL.DETR.DEEP_SUPERVISION", d.DEEP_SUPERVISION),
    ]
    problems = []
    for hf_key, key, ours in pairs:
        theirs = hf_config.get(hf_key)
        theirs = list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        if theirs != ours:
            problems.append(f"{hf_key}={theirs!r} but {key}={ours!r}")
    temperature = hf_config.get("positional_encoding_temperature")
    if float(temperature) != r.POSITION_TEMPERATURE:
        problems.append(
            f"positional_encoding_temperature={temperature} but MODEL.RTDETR.POSITION_TEMPERATURE="
            f"{r.POSITION_TEMPERATURE}"
        )
    noise = hf_config.get("label_noise_ratio", 0.5) * 0.5
    if d.DN.ENABLED and abs(noise - d.DN.LABEL_NOISE_RATIO) > 1e-9:
        problems.append(
            f"label_noise_ratio={hf_config.get('label_noise_ratio')} resamples with probability "
            f"{noise} but MODEL.DETR.DN.LABEL_NOISE_RATIO={d.DN.LABEL_NOISE_RATIO}"
        )
    num_labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels")
    if num_labels != d.NUM_CLASSES:
        problems.append(f"num_labels={num_labels} but MODEL.DETR.NUM_CLASSES={d.NUM_CLASSES}")
    hf_points = hf_config.get("decoder_n_points")
    if not isinstance(hf_points, (list, tuple)):
        hf_points = [hf_points] * hf_config.get("decoder_n_levels", r.NUM_FEATURE_LEVELS)
    hf_points = list(hf_points)
    if hf_points != points:
        problems.append(
            f"decoder_n_points={hf_config.get('decoder_n_points')} but MODEL.RTDETR.DEC_N_POINTS="
            f"{list(r.DEC_N_POINTS)}"
        )
    if sampling:
        for hf_key, key, ours in [
            ("decoder_offset_scale", "MODEL.RTDETR.OFFSET_SCALE", r.OFFSET_SCALE),
            ("decoder_method", "MODEL.RTDETR.SAMPLING_METHOD", r.SAMPLING_METHOD),
        ]:
            if hf_config.get(hf_key) != ours:
                problems.append(f"{hf_key}={hf_config.get(hf_key)!r} but {key}={ours!r}")
    if hf_config.get("eval_size") is not None:
        problems.append("eval_size is set (Hugging Face then drops AIFI's position embedding)")
    if cfg.MODEL.META_ARCHITECTURE != meta_arch:
        problems.append(f"MODEL.META_ARCHITECTURE must be {meta_arch!r}")
    return problems


register_hf_converter("rt_detr", hf_rt_detr_config_mismatches)(convert_hf_rt_detr)
register_hf_converter("rt_detr_v2", hf_rt_detr_config_mismatches)(convert_hf_rt_detr)
