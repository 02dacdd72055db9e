# Copyright (c) kd_detr contributors.
"""Hugging Face ``DFineForObjectDetection`` weights -> kd_detr ``DFINE`` keys, and the check of
its ``config.json`` against a kd_detr config.

Supported: transformers' HGNetV2 backbone (every ustc-community/dfine-* checkpoint) and
``eval_idx`` -1 (the last decoder layer predicts; no extra layers). The key rules are RT-DETR's
(:func:`~.hf_rt_detr.rename_rt_detr_family`) plus D-FINE's decoder parts (``pre_bbox_head``,
``lqe_layers``, ``reg_scale``, ``up``, the gate, the MLP FFN); the tied top-level heads are
dropped for the decoder's copy and the derived ``num_points_scale`` buffers are dropped.
"""
from typing import Dict, List, Mapping

import torch

from .hf_backbones import hf_hgnetv2_key
from .hf_rt_detr import family_mismatches, rename_rt_detr_family
from .registry import register_hf_converter

__all__ = ["convert_hf_d_fine", "hf_d_fine_config_mismatches"]

# Hugging Face HGNetV2Config field -> MODEL.HGNETV2 key.
_HGNETV2 = [
    ("stem_channels", "STEM_CHANNELS"),
    ("stage_in_channels", "STAGE_IN_CHANNELS"),
    ("stage_mid_channels", "STAGE_MID_CHANNELS"),
    ("stage_out_channels", "STAGE_OUT_CHANNELS"),
    ("stage_num_blocks", "STAGE_NUM_BLOCKS"),
    ("stage_downsample", "STAGE_DOWNSAMPLE"),
    ("stage_light_block", "STAGE_LIGHT_BLOCK"),
    ("stage_kernel_size", "STAGE_KERNEL_SIZE"),
    ("stage_numb_of_layers", "STAGE_NUM_LAYERS"),
    ("use_learnable_affine_block", "USE_LAB"),
]


def convert_hf_d_fine(
    hf_state_dict: Mapping[str, torch.Tensor], hf_config: Mapping, cfg=None
) -> Dict[str, torch.Tensor]:
    """Rename a ``DFineForObjectDetection`` state dict to kd_detr ``DFINE`` keys.

    Raises:
        ValueError: listing every key that no rule converts.
    """
    if hf_config.get("model_type") != "d_fine":
        raise ValueError(
            f"convert_hf_d_fine expects model_type 'd_fine', got {hf_config.get('model_type')!r}"
        )
    norm = cfg.MODEL.HGNETV2.NORM if cfg is not None else "FrozenBN"
    return rename_rt_detr_family(hf_state_dict, hf_hgnetv2_key, norm, "D-FINE")


def hf_d_fine_config_mismatches(hf_config: Mapping, cfg) -> List[str]:
    """Differences between a Hugging Face D-FINE ``config.json`` and a kd_detr config.

    Returns:
        list[str]: one readable line per mismatch (empty when the configs agree).
    """
    r, f = cfg.MODEL.RTDETR, cfg.MODEL.DFINE
    problems = family_mismatches(hf_config, cfg, "DFINE", sampling=True)
    blocks = round(3 * hf_config.get("depth_mult", 1.0))
    if blocks != r.CSP_BLOCKS:
        problems.append(
            f"depth_mult={hf_config.get('depth_mult')} gives {blocks} RepVGG blocks but "
            f"MODEL.RTDETR.CSP_BLOCKS={r.CSP_BLOCKS}"
        )
    for hf_key, key, ours in [
        ("max_num_bins", "MODEL.DFINE.NUM_BINS", f.NUM_BINS),
        ("reg_scale", "MODEL.DFINE.REG_SCALE", f.REG_SCALE),
        ("up", "MODEL.DFINE.UP", f.UP),
        ("top_prob_values", "MODEL.DFINE.LQE_TOP_K", f.LQE_TOP_K),
        ("lqe_hidden_dim", "MODEL.DFINE.LQE_HIDDEN_DIM", f.LQE_HIDDEN_DIM),
        ("lqe_layers", "MODEL.DFINE.LQE_LAYERS", f.LQE_LAYERS),
    ]:
        if hf_config.get(hf_key) != ours:
            problems.append(f"{hf_key}={hf_config.get(hf_key)!r} but {key}={ours!r}")
    layers = hf_config.get("decoder_layers")
    if hf_config.get("eval_idx", -1) not in (-1, layers - 1 if layers else -1):
        problems.append(f"eval_idx={hf_config.get('eval_idx')} (only -1, the last layer)")
    bb = hf_config.get("backbone_config") or {}
    if bb.get("model_type") != "hgnet_v2":
        return problems + [f"unsupported backbone {bb.get('model_type')!r} (expected hgnet_v2)"]
    h = cfg.MODEL.HGNETV2
    for hf_key, key in _HGNETV2:
        theirs, ours = bb.get(hf_key), h[key]
        theirs = list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        ours = list(ours) if isinstance(ours, (list, tuple)) else ours
        if theirs != ours:
            problems.append(f"backbone {hf_key}={theirs!r} but MODEL.HGNETV2.{key}={ours!r}")
    features = list(bb.get("out_features") or [])
    if features != list(r.IN_FEATURES):
        problems.append(
            f"backbone outputs {features} but MODEL.RTDETR.IN_FEATURES={list(r.IN_FEATURES)}"
        )
    return problems


register_hf_converter("d_fine", hf_d_fine_config_mismatches)(convert_hf_d_fine)
