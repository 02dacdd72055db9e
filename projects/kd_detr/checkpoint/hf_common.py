# Copyright (c) kd_detr contributors.
"""Pieces shared by the Hugging Face DETR-family converters (:mod:`.hf_detr`,
:mod:`.hf_dab_detr`, :mod:`.hf_deformable_detr`): splitting off and renaming the ResNet backbone,
the final unconverted-keys error and the config checks common to all of them."""
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..modeling.backbone import convert_torchvision_resnet

__all__ = [
    "BACKBONE_PREFIX",
    "CANONICAL_RENAMES",
    "add_backbone",
    "apply_rules",
    "backbone_facts",
    "config_mismatches",
    "convert_backbone",
    "split_backbone",
    "transformer_config_pairs",
]

# Where transformers' DETR-family models keep the backbone weights (on-disk key layout).
BACKBONE_PREFIX = "model.backbone.conv_encoder.model."
# Canonical (on-disk) spellings of the keys renamed by transformers >= 5.
CANONICAL_RENAMES = [
    (r"^model\.backbone\.model\.", BACKBONE_PREFIX),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.layers\.(\d+)\.mlp\.fc(\d)\.", r".layers.\1.fc\2."),
]

_NORM = r"(weight|bias|running_mean|running_var)"
_STAGE = r"encoder\.stages\.(\d)\.layers\.(\d+)\."
_HF_RESNET = [
    (r"embedder\.embedder\.convolution\.weight$", "stem.conv1.weight"),
    (rf"embedder\.embedder\.normalization\.{_NORM}$", r"stem.conv1.norm.\1"),
    (
        _STAGE + r"shortcut\.convolution\.weight$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.shortcut.weight",
    ),
    (
        _STAGE + rf"shortcut\.normalization\.{_NORM}$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.shortcut.norm.{m[3]}",
    ),
    (
        _STAGE + r"layer\.(\d)\.convolution\.weight$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.weight",
    ),
    (
        _STAGE + rf"layer\.(\d)\.normalization\.{_NORM}$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm.{m[4]}",
    ),
]


def apply_rules(rules, key: str) -> Optional[str]:
    """``key`` renamed by the first (pattern, replacement) rule whose pattern it contains
    (``re.search``), or None when no rule applies."""
    for pattern, repl in rules:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_backbone(
    state_dict: Mapping[str, torch.Tensor], kind: str
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename ResNet backbone weights to kd_detr ``backbone.*`` keys.

    Args:
        state_dict: backbone weights with :data:`BACKBONE_PREFIX` stripped.
        kind: "timm_backbone" (torchvision names) or "resnet" (transformers' own ResNet).

    Returns:
        tuple[dict, list[str]]: the converted weights and the keys no rule converts.
    """
    if kind == "timm_backbone":  # torchvision names
        return convert_torchvision_resnet(state_dict, prefix="backbone."), []
    converted, unconverted = {}, []
    for key, value in state_dict.items():
        new = apply_rules(_HF_RESNET, key)
        if new is None:
            unconverted.append(key)
        else:
            converted["backbone." + new] = value
    return converted, unconverted


def split_backbone(
    hf_state_dict: Mapping[str, torch.Tensor], renames: Sequence = ()
) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str, torch.Tensor]]]:
    """Split a Hugging Face state dict into its backbone and the rest.

    Args:
        hf_state_dict: the Hugging Face weights.
        renames: (pattern, replacement) applied in turn (``re.sub``) to every key first, e.g.
            :data:`CANONICAL_RENAMES`.

    Returns:
        tuple: the backbone weights with :data:`BACKBONE_PREFIX` stripped, and (original key,
        renamed key, tensor) of the other weights; ``num_batches_tracked`` buffers are dropped.
    """
    backbone, rest = {}, []
    for key, value in hf_state_dict.items():
        new = key
        for pattern, repl in renames:
            new = re.sub(pattern, repl, new)
        if new.endswith("num_batches_tracked"):
            continue
        if new.startswith(BACKBONE_PREFIX):
            backbone[new[len(BACKBONE_PREFIX) :]] = value
        else:
            rest.append((key, new, value))
    return backbone, rest


def add_backbone(
    converted: Dict[str, torch.Tensor],
    unconverted: List[str],
    backbone: Mapping[str, torch.Tensor],
    kind: str,
    model_name: str,
    require_backbone: bool = True,
) -> None:
    """Rename ``backbone`` (see :func:`convert_backbone`) into ``converted``, then raise
    ValueError listing ``unconverted`` and the backbone keys no rule converts, if any.

    Args:
        model_name: how the error names the model, e.g. "DETR".
        require_backbone: also report a state dict without backbone weights.
    """
    backbone, backbone_unconverted = convert_backbone(backbone, kind)
    converted.update(backbone)
    unconverted = unconverted + [BACKBONE_PREFIX + k for k in backbone_unconverted]
    if require_backbone and not backbone:
        unconverted.append(f"(no backbone keys under {BACKBONE_PREFIX})")
    if unconverted:
        raise ValueError(
            f"{len(unconverted)} Hugging Face {model_name} keys were not converted (unsupported "
            f"model parts?): {sorted(unconverted)}"
        )


def _timm_depth(name):
    m = re.match(r"^(?:timm/)?resnet(18|34|50|101|152)(?:\..*)?$", name or "")
    return None if m is None else int(m[1])


def backbone_facts(hf_config: Mapping) -> Tuple[Optional[int], bool]:
    """(ResNet depth or None, stride in the 1x1 conv) of the Hugging Face backbone."""
    bb = hf_config.get("backbone_config") or {}
    if bb.get("model_type") == "resnet":
        blocks = tuple(bb.get("depths", ()))
        basic = bb.get("layer_type") == "basic"
        table = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34 if basic else 50, (3, 4, 23, 3): 101}
        table[(3, 8, 36, 3)] = 152
        return table.get(blocks), bool(bb.get("downsample_in_bottleneck", False))
    return _timm_depth(bb.get("backbone", hf_config.get("backbone"))), False


def transformer_config_pairs(cfg, width_key: str) -> List[Tuple[str, str, object]]:
    """(Hugging Face key, kd_detr key, kd_detr value) of the encoder-decoder sizes shared by the
    DETR family; ``width_key`` is the Hugging Face name of ``MODEL.DETR.HIDDEN_DIM``."""
    d = cfg.MODEL.DETR
    return [
        (width_key, "MODEL.DETR.HIDDEN_DIM", d.HIDDEN_DIM),
        ("encoder_layers", "MODEL.DETR.ENC_LAYERS", d.ENC_LAYERS),
        ("decoder_layers", "MODEL.DETR.DEC_LAYERS", d.DEC_LAYERS),
        ("encoder_attention_heads", "MODEL.DETR.NHEADS", d.NHEADS),
        ("decoder_attention_heads", "MODEL.DETR.NHEADS", d.NHEADS),
        ("encoder_ffn_dim", "MODEL.DETR.DIM_FEEDFORWARD", d.DIM_FEEDFORWARD),
        ("decoder_ffn_dim", "MODEL.DETR.DIM_FEEDFORWARD", d.DIM_FEEDFORWARD),
        ("num_queries", "MODEL.DETR.NUM_QUERIES", d.NUM_QUERIES),
        ("activation_function", "MODEL.DETR.ACTIVATION", d.ACTIVATION),
    ]


def config_mismatches(
    hf_config: Mapping,
    cfg,
    pairs: Sequence[Tuple[str, str, object]],
    checks: Sequence[Tuple[bool, str]],
) -> List[str]:
    """Differences between a Hugging Face ``config.json`` and a kd_detr config.

    Args:
        hf_config: the Hugging Face config as a dict.
        cfg: the kd_detr config.
        pairs: (Hugging Face key, kd_detr key, kd_detr value) that must be equal.
        checks: (condition, message) reported when the condition is false.

    Returns:
        list[str]: one readable line per mismatch, in the order: pairs, number of classes,
        checks, backbone (empty when the configs agree).
    """
    d, problems = cfg.MODEL.DETR, []
    num_labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels")
    for hf_key, key, ours in pairs:
        if hf_config.get(hf_key) != ours:
            problems.append(f"{hf_key}={hf_config.get(hf_key)!r} but {key}={ours!r}")
    if num_labels != d.NUM_CLASSES:
        problems.append(f"num_labels={num_labels} but MODEL.DETR.NUM_CLASSES={d.NUM_CLASSES}")
    problems += [message for ok, message in checks if not ok]
    depth, stride_in_1x1 = backbone_facts(hf_config)
    if depth is None:
        problems.append("unsupported Hugging Face backbone (expected ResNet-18/34/50/101/152)")
    elif depth != cfg.MODEL.RESNETS.DEPTH:
        problems.append(
            f"backbone is ResNet-{depth} but MODEL.RESNETS.DEPTH={cfg.MODEL.RESNETS.DEPTH}"
        )
    if depth is not None and depth >= 50 and stride_in_1x1 != cfg.MODEL.RESNETS.STRIDE_IN_1X1:
        problems.append(f"MODEL.RESNETS.STRIDE_IN_1X1 must be {stride_in_1x1}")
    return problems
