# Copyright (c) kd_detr contributors.
"""detrex checkpoints (``--source detrex``): ``projects/detr`` DETR, ``projects/dab_detr``
DAB-DETR (``projects/dn_detr``'s label encoder included), ``projects/deformable_detr``
(:mod:`.detrex_deformable_detr`) and ``projects/dino`` (:mod:`.detrex_dino`), chosen by the
config's meta-architecture and checked against the checkpoint's keys. detrex uses Detectron2's
ResNet, whose names are ours."""
from typing import Dict

import torch

from .detrex_deformable_detr import convert_detrex_deformable_detr, is_detrex_deformable_detr
from .detrex_dino import convert_detrex_dino, is_detrex_dino
from .official import finish_conversion
from .registry import register_checkpoint_converter
from .rename import Tied, load_state_dict, rename_keys, split_packed_qkv

__all__ = ["convert_detrex"]

_ENC = r"transformer\.encoder\.layers\.(\d+)\."
_DEC = r"transformer\.decoder\.layers\.(\d+)\."
_BACKBONE = (r"backbone\.((?:stem|res[2-5])\..+)", r"backbone.\1")


def _norms(prefix_in: str, prefix_out: str):
    # detrex norms.N -> our normN+1 (post-norm order: after self-attn, cross-attn, FFN).
    return [
        (prefix_in + rf"norms\.{n}\.(.+)", prefix_out + rf"norm{n + 1}.\2") for n in range(3)
    ]


def _ffn(prefix_in: str, source: str, prefix_out: str):
    # Linear, activation (PReLU in DAB-DETR: registered twice), Linear.
    return [
        (prefix_in + r"ffns\.0\.layers\.0\.0\.(.+)", prefix_out + r"ffn.linear1.\2"),
        (prefix_in + r"ffns\.0\.layers\.1\.(.+)", prefix_out + r"ffn.linear2.\2"),
        (prefix_in + r"ffns\.0\.activation\.weight", prefix_out + r"ffn.activation.weight"),
        (prefix_in + r"ffns\.0\.layers\.0\.1\.weight", Tied(source + "ffns.0.activation.weight")),
    ]


def _qkv(prefix_in: str, index: int, prefix_out: str):
    pattern = prefix_in + rf"attentions\.{index}\.attn\.in_proj_(weight|bias)"
    return (pattern, split_packed_qkv(prefix_out))


_ENC_KEY, _DEC_KEY = r"transformer.encoder.layers.\1.", r"transformer.decoder.layers.\1."
_ENC_OUT = r"transformer.encoder.layers.\1."
_DAB_ENC_OUT = r"transformer.encoder_layers.\1."


DETR_RULES = [
    _BACKBONE,
    _qkv(_ENC, 0, _ENC_OUT + "self_attn"),
    _qkv(_DEC, 0, _DEC_KEY + "self_attn"),
    _qkv(_DEC, 1, _DEC_KEY + "cross_attn"),
    (_ENC + r"attentions\.0\.attn\.out_proj\.(.+)", _ENC_OUT + r"self_attn.out_proj.\2"),
    (_DEC + r"attentions\.0\.attn\.out_proj\.(.+)", _DEC_KEY + r"self_attn.out_proj.\2"),
    (_DEC + r"attentions\.1\.attn\.out_proj\.(.+)", _DEC_KEY + r"cross_attn.out_proj.\2"),
    *_ffn(_ENC, _ENC_KEY, _ENC_OUT),
    *_ffn(_DEC, _DEC_KEY, _DEC_KEY),
    *_norms(_ENC, _ENC_OUT),
    *_norms(_DEC, _DEC_KEY),
    (r"transformer\.(encoder|decoder)\.post_norm_layer\.(.+)", r"transformer.\1.norm.\2"),
    (r"(class_embed|bbox_embed|query_embed|input_proj)\.(.+)", r"\1.\2"),
]

_SELF = {
    "query_content_proj": "sa_qcontent_proj",
    "query_pos_proj": "sa_qpos_proj",
    "key_content_proj": "sa_kcontent_proj",
    "key_pos_proj": "sa_kpos_proj",
    "value_proj": "sa_v_proj",
    "out_proj": "self_attn_out_proj",
}
_CROSS = {
    "query_content_proj": "ca_qcontent_proj",
    "query_pos_proj": "ca_qpos_proj",
    "query_pos_sine_proj": "ca_qpos_sine_proj",
    "key_content_proj": "ca_kcontent_proj",
    "key_pos_proj": "ca_kpos_proj",
    "value_proj": "ca_v_proj",
    "out_proj": "cross_attn_out_proj",
}
DAB_DETR_RULES = [
    _BACKBONE,
    _qkv(_ENC, 0, _DAB_ENC_OUT + "self_attn"),
    (_ENC + r"attentions\.0\.attn\.out_proj\.(.+)", _DAB_ENC_OUT + r"self_attn.out_proj.\2"),
    *_ffn(_ENC, _ENC_KEY, _DAB_ENC_OUT),
    *_norms(_ENC, _DAB_ENC_OUT),
    (r"transformer\.encoder\.query_scale\.(.+)", r"transformer.encoder_query_scale.\1"),
    *[(_DEC + rf"attentions\.0\.{a}\.(.+)", _DEC_KEY + rf"{b}.\2") for a, b in _SELF.items()],
    *[(_DEC + rf"attentions\.1\.{a}\.(.+)", _DEC_KEY + rf"{b}.\2") for a, b in _CROSS.items()],
    *_ffn(_DEC, _DEC_KEY, _DEC_KEY),
    *_norms(_DEC, _DEC_KEY),
    (r"transformer\.decoder\.post_norm_layer\.(.+)", r"transformer.decoder.norm.\1"),
    (
        r"transformer\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.(.+)",
        r"transformer.decoder.\1.\2",
    ),
    (r"transformer\.decoder\.bbox_embed\.(.+)", Tied(r"bbox_embed.\1")),
    (r"(?:anchor_box_embed|refpoint_embed)\.weight", "refpoint_embed.weight"),
    (r"denoising_generator\.label_encoder\.weight", "denoising.label_enc.weight"),
    (r"(class_embed|bbox_embed|input_proj)\.(.+)", r"\1.\2"),
]


@register_checkpoint_converter("detrex")
def convert_detrex(source, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """detrex DETR / DAB-DETR (DN-DETR) / Deformable DETR / DINO checkpoint -> kd_detr state dict
    for ``cfg``'s meta-architecture (``DETR``, ``DABDETR``, ``DeformableDETR`` or ``DINO``)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    rules = {"DETR": DETR_RULES, "DABDETR": DAB_DETR_RULES}.get(arch)
    if rules is None and arch not in ("DeformableDETR", "DINO"):
        raise ValueError(
            f"--source detrex supports DETR, DABDETR, DeformableDETR and DINO configs, got {arch}"
        )
    state = load_state_dict(source)
    if arch == "DINO":
        return convert_detrex_dino(state, cfg, coco_classes)
    if is_detrex_dino(state):
        raise ValueError(f"this detrex checkpoint is a DINO: use a DINO config, not {arch}")
    if arch == "DeformableDETR":
        return convert_detrex_deformable_detr(state, cfg, coco_classes)
    if is_detrex_deformable_detr(state):
        raise ValueError(
            "this detrex checkpoint is a Deformable DETR (it has transformer.level_embeds): "
            f"use a DeformableDETR config, not {arch}"
        )
    state = rename_keys(state, rules, f"detrex {arch}")
    return finish_conversion(state, cfg, coco_classes)
