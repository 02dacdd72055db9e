# Copyright (c) kd_detr contributors.
"""Checkpoints of the official repositories: facebookresearch/detr (``--source detr``) and
IDEA-Research/DAB-DETR or DN-DETR's DN-DAB-DETR (``--source dab_detr``).

Both keep a torchvision ResNet under ``backbone.0.body`` and store ``{"model": state_dict}``.
Their COCO heads have 91 category-id slots (see :mod:`.coco_classes`), mapped to Detectron2's 80
classes when the target config has 80 (``coco_classes`` "auto", the default).
"""
from typing import Dict

import torch

from .registry import register_checkpoint_converter
from .rename import (
    Tied,
    adapt_class_rows,
    check_hidden_size,
    expected_class_rows,
    load_state_dict,
    rename_keys,
    split_packed_qkv,
    torchvision_backbone,
)

__all__ = ["convert_official_dab_detr", "convert_official_detr"]

_P = r"(weight|bias)"
_ENC = r"transformer\.encoder\.layers\.(\d+)\."
_DEC = r"transformer\.decoder\.layers\.(\d+)\."

_ENC_OUT, _DEC_OUT = r"transformer.encoder.layers.\1.", r"transformer.decoder.layers.\1."
_DAB_ENC_OUT = r"transformer.encoder_layers.\1."


def _qkv(prefix_in: str, module: str, prefix_out: str):
    return (prefix_in + module + rf"\.in_proj_{_P}", split_packed_qkv(prefix_out))


DETR_RULES = [
    _qkv(_ENC, "self_attn", _ENC_OUT + "self_attn"),
    _qkv(_DEC, "self_attn", _DEC_OUT + "self_attn"),
    _qkv(_DEC, "multihead_attn", _DEC_OUT + "cross_attn"),
    (_DEC + rf"multihead_attn\.out_proj\.{_P}", _DEC_OUT + r"cross_attn.out_proj.\2"),
    (_ENC + r"linear([12])\.(.+)", _ENC_OUT + r"ffn.linear\2.\3"),
    (_DEC + r"linear([12])\.(.+)", _DEC_OUT + r"ffn.linear\2.\3"),
    (_ENC + r"(self_attn\.out_proj|norm[12])\.(.+)", _ENC_OUT + r"\2.\3"),
    (_DEC + r"(self_attn\.out_proj|norm[123])\.(.+)", _DEC_OUT + r"\2.\3"),
    (r"transformer\.(encoder|decoder)\.norm\.(.+)", r"transformer.\1.norm.\2"),
    (r"(class_embed|bbox_embed|query_embed|input_proj)\.(.+)", r"\1.\2"),
]

DAB_DETR_RULES = [
    _qkv(_ENC, "self_attn", _DAB_ENC_OUT + "self_attn"),
    (_ENC + r"(self_attn\.out_proj|norm[12])\.(.+)", _DAB_ENC_OUT + r"\2.\3"),
    (_ENC + r"linear([12])\.(.+)", _DAB_ENC_OUT + r"ffn.linear\2.\3"),
    (_ENC + r"activation\.weight", _DAB_ENC_OUT + "ffn.activation.weight"),
    (r"transformer\.encoder\.query_scale\.(.+)", r"transformer.encoder_query_scale.\1"),
    (_DEC + r"((?:sa|ca)_\w+_proj|norm[123])\.(.+)", _DEC_OUT + r"\2.\3"),
    (_DEC + r"(self|cross)_attn\.out_proj\.(.+)", _DEC_OUT + r"\2_attn_out_proj.\3"),
    (_DEC + r"linear([12])\.(.+)", _DEC_OUT + r"ffn.linear\2.\3"),
    (_DEC + r"activation\.weight", _DEC_OUT + "ffn.activation.weight"),
    (
        r"transformer\.decoder\.(norm|query_scale|ref_point_head|ref_anchor_head)\.(.+)",
        r"transformer.decoder.\1.\2",
    ),
    (r"transformer\.decoder\.bbox_embed\.(.+)", Tied(r"bbox_embed.\1")),
    (r"transformer\.patterns\.weight", "patterns.weight"),
    (r"label_enc\.weight", "denoising.label_enc.weight"),
    (r"(class_embed|bbox_embed|refpoint_embed|input_proj)\.(.+)", r"\1.\2"),
]


def finish_conversion(state: Dict[str, torch.Tensor], cfg, coco_classes: str) -> Dict:
    """Checks and class-row mapping shared by the official and detrex converters."""
    check_hidden_size(state, cfg)
    rows, softmax = expected_class_rows(cfg)
    hint = f"MODEL.DETR.NUM_CLASSES={cfg.MODEL.DETR.NUM_CLASSES}"
    for param in ("weight", "bias"):
        adapt_class_rows(state, f"class_embed.{param}", rows, softmax, coco_classes, hint)
    label_key = "denoising.label_enc.weight"
    if label_key in state and not cfg.MODEL.DETR.DN.ENABLED:
        raise ValueError(
            f"{label_key} (a DN-DETR label embedding) is in the checkpoint: its detection queries "
            "take their content from it, so set MODEL.DETR.DN.ENABLED True"
        )
    label_rows = cfg.MODEL.DETR.NUM_CLASSES + 1
    adapt_class_rows(state, label_key, label_rows, True, coco_classes, hint + " + no-object")
    return state


@register_checkpoint_converter("detr")
def convert_official_detr(source, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """facebookresearch/detr checkpoint (path or state dict) -> kd_detr ``DETR`` state dict."""
    if cfg.MODEL.META_ARCHITECTURE != "DETR":
        raise ValueError(f"--source detr needs a DETR config, got {cfg.MODEL.META_ARCHITECTURE}")
    backbone, rest = torchvision_backbone(load_state_dict(source), "backbone.0.body.")
    state = rename_keys(rest, DETR_RULES, "facebookresearch/detr")
    state.update(backbone)
    return finish_conversion(state, cfg, coco_classes)


@register_checkpoint_converter("dab_detr")
def convert_official_dab_detr(source, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """IDEA-Research DAB-DETR / DN-DAB-DETR checkpoint -> kd_detr ``DABDETR`` state dict (a
    DN-DAB-DETR ``label_enc`` needs ``MODEL.DETR.DN.ENABLED``)."""
    if cfg.MODEL.META_ARCHITECTURE != "DABDETR":
        raise ValueError(
            f"--source dab_detr needs a DABDETR config, got {cfg.MODEL.META_ARCHITECTURE}"
        )
    backbone, rest = torchvision_backbone(load_state_dict(source), "backbone.0.body.")
    state = rename_keys(rest, DAB_DETR_RULES, "IDEA-Research/DAB-DETR")
    state.update(backbone)
    return finish_conversion(state, cfg, coco_classes)
