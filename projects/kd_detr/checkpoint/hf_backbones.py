# Copyright (c) kd_detr contributors.
"""Key renaming of transformers' real-time backbones to kd_detr's: ``RTDetrResNetBackbone`` ->
:class:`~kd_detr.modeling.backbone.ResNetVD` and ``HGNetV2Backbone`` ->
:class:`~kd_detr.modeling.backbone.HGNetV2` (whose module names already match)."""
import re
from typing import Optional

from .hf_common import apply_rules

__all__ = ["BACKBONE_PREFIXES", "hf_hgnetv2_key", "hf_resnet_vd_key"]

# Where RT-DETR / D-FINE keep the backbone (in-memory and on-disk spellings).
BACKBONE_PREFIXES = ("model.backbone.model.", "model.backbone.conv_encoder.model.")

_NORM = r"(weight|bias|running_mean|running_var)"
_STAGE = r"^encoder\.stages\.(\d)\.layers\.(\d+)\."
_RESNET_VD = [
    (
        r"^embedder\.embedder\.(\d)\.convolution\.weight$",
        lambda m: f"stem.conv{int(m[1]) + 1}.weight",
    ),
    (
        rf"^embedder\.embedder\.(\d)\.normalization\.{_NORM}$",
        lambda m: f"stem.conv{int(m[1]) + 1}.norm.{m[2]}",
    ),
    (
        _STAGE + r"layer\.(\d)\.convolution\.weight$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.weight",
    ),
    (
        _STAGE + rf"layer\.(\d)\.normalization\.{_NORM}$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm.{m[4]}",
    ),
    (
        _STAGE + r"shortcut\.(?:1\.)?convolution\.weight$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.shortcut.weight",
    ),
    (
        _STAGE + rf"shortcut\.(?:1\.)?normalization\.{_NORM}$",
        lambda m: f"res{int(m[1]) + 2}.{m[2]}.shortcut.norm.{m[3]}",
    ),
]
_HGNETV2 = re.compile(
    r"^(embedder\.stem\w+|encoder\.stages\.\d+\.(?:downsample|blocks\.\d+\.(?:layers\.\d+"
    r"(?:\.conv[12])?|aggregation\.[01])))\.(convolution\.weight|normalization\.(?:weight|bias|"
    r"running_mean|running_var)|lab\.(?:scale|bias))$"
)


def hf_resnet_vd_key(key: str) -> Optional[str]:
    """kd_detr name (without "backbone.") of an ``RTDetrResNetBackbone`` key (prefix stripped),
    or None when no rule applies (``num_batches_tracked`` included: ResNetVD keeps none)."""
    return apply_rules(_RESNET_VD, key)


def hf_hgnetv2_key(key: str) -> Optional[str]:
    """kd_detr name (without "backbone.") of an ``HGNetV2Backbone`` key (prefix stripped): the
    same name; None for keys HGNetV2 does not have (``num_batches_tracked``, unknown modules)."""
    return key if _HGNETV2.match(key) else None
