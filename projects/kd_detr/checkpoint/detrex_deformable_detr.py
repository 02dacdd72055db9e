# Copyright (c) kd_detr contributors.
"""detrex ``projects/deformable_detr`` checkpoints (part of ``--source detrex``, chosen when the
config is a ``DeformableDETR``): plain, box refinement and two-stage.

detrex keeps Detectron2's ResNet names (ours); the projections are a ``ChannelMapper`` neck
(``neck.convs.i.{conv,norm}`` for the backbone levels, ``neck.extra_convs.j`` for the stride-2
levels after them); ``transformer.level_embeds``; ``BaseTransformerLayer`` layers with
``attentions.N`` (encoder: the deformable attention; decoder: ``attentions.0.attn`` an
``nn.MultiheadAttention``, ``attentions.1`` the deformable cross-attention), ``ffns.0.layers``
and ``norms.N`` in operation order; ``query_embedding``; heads as in the official code (see
:mod:`.deformable_common`). Some detrex versions name the two-stage proposal norm
``enc_outpout_norm``; both spellings are accepted.
"""
from typing import Dict, Mapping

import torch

from .deformable_common import finish_deformable_conversion, has_refine_copies
from .rename import Tied, rename_keys, split_packed_qkv

__all__ = [
    "convert_detrex_deformable_detr",
    "detrex_deformable_detr_rules",
    "is_detrex_deformable_detr",
]

_ENC = r"transformer\.encoder\.layers\.(\d+)\."
_DEC = r"transformer\.decoder\.layers\.(\d+)\."
_ENC_OUT, _DEC_OUT = r"transformer.encoder.layers.\1.", r"transformer.decoder.layers.\1."
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_P = r"(weight|bias)"
_LEVEL_EMBED = "transformer.level_embeds"


def is_detrex_deformable_detr(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a detrex state dict is a Deformable DETR (it has multi-scale level embeddings)."""
    return _LEVEL_EMBED in state


def _layer_rules(prefix_in: str, prefix_out: str, num_norms: int):
    ffn = [
        (prefix_in + rf"ffns\.0\.layers\.0\.0\.{_P}", prefix_out + r"ffn.linear1.\2"),
        (prefix_in + rf"ffns\.0\.layers\.1\.{_P}", prefix_out + r"ffn.linear2.\2"),
    ]
    norms = [
        (prefix_in + rf"norms\.{n}\.{_P}", prefix_out + rf"norm{n + 1}.\2")
        for n in range(num_norms)
    ]
    return ffn + norms


def _extra_level(offset: int):
    """Rule target of ``neck.extra_convs.j``: kd_detr's ``input_proj.{offset + j}``."""

    def target(match, value):
        index, module, param = match.groups()
        part = 0 if module == "conv" else 1
        return {f"input_proj.{offset + int(index)}.{part}.{param}": value}

    return target


def detrex_deformable_detr_rules(num_backbone_levels: int):
    """Renaming rules; ``num_backbone_levels`` is the number of ``neck.convs``."""
    return [
        (r"backbone\.((?:stem|res[2-5])\..+)", r"backbone.\1"),
        (rf"neck\.convs\.(\d+)\.conv\.{_P}", r"input_proj.\1.0.\2"),
        (rf"neck\.convs\.(\d+)\.norm\.{_P}", r"input_proj.\1.1.\2"),
        (rf"neck\.extra_convs\.(\d+)\.(conv|norm)\.{_P}", _extra_level(num_backbone_levels)),
        (_ENC + r"attentions\.0\." + _MSDA, _ENC_OUT + r"self_attn.\2.\3"),
        *_layer_rules(_ENC, _ENC_OUT, 2),
        (_DEC + rf"attentions\.0\.attn\.in_proj_{_P}", split_packed_qkv(_DEC_OUT + "self_attn")),
        (_DEC + rf"attentions\.0\.attn\.out_proj\.{_P}", _DEC_OUT + r"self_attn.out_proj.\2"),
        (_DEC + r"attentions\.1\." + _MSDA, _DEC_OUT + r"cross_attn.\2.\3"),
        *_layer_rules(_DEC, _DEC_OUT, 3),
        (r"transformer\.level_embeds", "transformer.level_embed"),
        (rf"transformer\.reference_points\.{_P}", r"reference_points.\1"),
        (rf"transformer\.enc_output\.{_P}", r"encoder_proposals.enc_output.\1"),
        (rf"transformer\.enc_out(?:put|pout)_norm\.{_P}", r"encoder_proposals.enc_output_norm.\1"),
        (rf"transformer\.(pos_trans|pos_trans_norm)\.{_P}", r"proposal_query.\1.\2"),
        (r"transformer\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.+)", Tied(r"\1.\2.\3")),
        (r"(class_embed|bbox_embed)\.(\d+)\.(.+)", r"\1.\2.\3"),
        (r"query_embedding\.weight", "query_embed.weight"),
    ]


_NAMES = {"query": "query_embedding.weight", "proposals": "transformer.enc_output.*"}


def convert_detrex_deformable_detr(
    state: Mapping[str, torch.Tensor], cfg, coco_classes: str = "auto"
) -> Dict[str, torch.Tensor]:
    """detrex Deformable DETR state dict -> kd_detr ``DeformableDETR`` state dict for ``cfg``."""
    if not is_detrex_deformable_detr(state):
        raise ValueError(
            f"not a detrex Deformable DETR checkpoint (no {_LEVEL_EMBED}): detrex DETR / "
            "DAB-DETR checkpoints need a DETR / DABDETR config"
        )
    convs = {key.split(".")[2] for key in state if key.startswith("neck.convs.")}
    rules = detrex_deformable_detr_rules(len(convs))
    converted = rename_keys(state, rules, "detrex DeformableDETR")
    refine = has_refine_copies(state)
    return finish_deformable_conversion(converted, cfg, coco_classes, refine, _NAMES)
