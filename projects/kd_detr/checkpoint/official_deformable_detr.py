# Copyright (c) kd_detr contributors.
"""fundamentalvision/Deformable-DETR checkpoints (``--source deformable_detr``): plain,
``--with_box_refine`` and ``--two_stage`` (which the official code runs with box refinement).

Layout (``{"model": state_dict}``): a torchvision ResNet with frozen BatchNorm under
``backbone.0.body`` (layer2-4 feed the transformer); ``transformer.level_embed``; encoder layers
with an ``MSDeformAttn`` ``self_attn``; decoder layers whose ``norm1`` follows the cross-attention
and ``norm2`` the ``nn.MultiheadAttention`` self-attention (kd_detr's order is the reverse), with
packed q/k/v; ``query_embed`` (Q, 2d) whose first half is the positional query and second half the
content, as kd_detr splits it; ``transformer.reference_points`` or, two-stage, ``enc_output(_norm)``
and ``pos_trans(_norm)``; heads as lists ``class_embed.i`` / ``bbox_embed.i`` (see
:mod:`.deformable_common`), referenced again as ``transformer.decoder.bbox_embed`` (box refinement)
and ``transformer.decoder.class_embed`` (two-stage). COCO heads have 91 category-id slots.
"""
from typing import Dict

import torch

from .deformable_common import finish_deformable_conversion, has_refine_copies
from .registry import register_checkpoint_converter
from .rename import Tied, load_state_dict, rename_keys, split_packed_qkv, torchvision_backbone

__all__ = ["DEFORMABLE_DETR_RULES", "convert_official_deformable_detr"]

_ENC = r"transformer\.encoder\.layers\.(\d+)\."
_DEC = r"transformer\.decoder\.layers\.(\d+)\."
_ENC_OUT, _DEC_OUT = r"transformer.encoder.layers.\1.", r"transformer.decoder.layers.\1."
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_P = r"(weight|bias)"

DEFORMABLE_DETR_RULES = [
    (_ENC + r"self_attn\." + _MSDA, _ENC_OUT + r"self_attn.\2.\3"),
    (_ENC + rf"linear([12])\.{_P}", _ENC_OUT + r"ffn.linear\2.\3"),
    (_ENC + rf"(norm[12])\.{_P}", _ENC_OUT + r"\2.\3"),
    (_DEC + r"cross_attn\." + _MSDA, _DEC_OUT + r"cross_attn.\2.\3"),
    (_DEC + rf"self_attn\.in_proj_{_P}", split_packed_qkv(_DEC_OUT + "self_attn")),
    (_DEC + rf"self_attn\.out_proj\.{_P}", _DEC_OUT + r"self_attn.out_proj.\2"),
    (_DEC + rf"linear([12])\.{_P}", _DEC_OUT + r"ffn.linear\2.\3"),
    (_DEC + rf"norm1\.{_P}", _DEC_OUT + r"norm2.\2"),  # after the cross-attention
    (_DEC + rf"norm2\.{_P}", _DEC_OUT + r"norm1.\2"),  # after the self-attention
    (_DEC + rf"norm3\.{_P}", _DEC_OUT + r"norm3.\2"),
    (r"transformer\.level_embed", "transformer.level_embed"),
    (rf"transformer\.reference_points\.{_P}", r"reference_points.\1"),
    (rf"transformer\.(enc_output|enc_output_norm)\.{_P}", r"encoder_proposals.\1.\2"),
    (rf"transformer\.(pos_trans|pos_trans_norm)\.{_P}", r"proposal_query.\1.\2"),
    (r"transformer\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.+)", Tied(r"\1.\2.\3")),
    (r"(class_embed|bbox_embed)\.(\d+)\.(.+)", r"\1.\2.\3"),
    (rf"input_proj\.(\d+)\.([01])\.{_P}", r"input_proj.\1.\2.\3"),
    (r"query_embed\.weight", "query_embed.weight"),
]

_NAMES = {"query": "query_embed.weight", "proposals": "transformer.enc_output.*"}


@register_checkpoint_converter("deformable_detr")
def convert_official_deformable_detr(
    source, cfg, coco_classes: str = "auto"
) -> Dict[str, torch.Tensor]:
    """fundamentalvision/Deformable-DETR checkpoint (path or state dict) -> kd_detr
    ``DeformableDETR`` state dict; the config's WITH_BOX_REFINE / TWO_STAGE must match it."""
    if cfg.MODEL.META_ARCHITECTURE != "DeformableDETR":
        raise ValueError(
            "--source deformable_detr needs a DeformableDETR config, got "
            f"{cfg.MODEL.META_ARCHITECTURE}"
        )
    state = load_state_dict(source)
    if "transformer.level_embed" not in state:
        raise ValueError(
            "not a fundamentalvision/Deformable-DETR checkpoint: no transformer.level_embed "
            "(DETR / DAB-DETR checkpoints: --source detr / dab_detr)"
        )
    refine = has_refine_copies(state)
    backbone, rest = torchvision_backbone(state, "backbone.0.body.")
    converted = rename_keys(rest, DEFORMABLE_DETR_RULES, "fundamentalvision/Deformable-DETR")
    converted.update(backbone)
    return finish_deformable_conversion(converted, cfg, coco_classes, refine, _NAMES)
