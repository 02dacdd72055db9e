# Copyright (c) kd_detr contributors.
"""Peterande/D-FINE checkpoints (``--source d_fine``) with the HGNetv2 backbone.

Layout (read from ``src/nn/backbone/hgnetv2.py``, ``src/zoo/dfine/hybrid_encoder.py`` and
``dfine_decoder.py``); the file is the solver's state like RT-DETR's (``ema.module`` preferred over
``model``, see :func:`.official_rt_detr.select_official_weights`):

- backbone ``backbone.stem.stem*`` and ``backbone.stages.S.{downsample,blocks.B.{layers.L,
  aggregation.0/1}}``, every ConvBNAct ``.conv`` / ``.bn`` / ``.lab`` (learnable affine):
  kd_detr's ``HGNetV2`` keeps transformers' names (``embedder.stem*``,
  ``encoder.stages.S....``, ``.convolution`` / ``.normalization`` / ``.lab``).
- encoder: ``input_proj.L`` (conv= / norm=), AIFI ``encoder.I.layers.J`` (packed self-attention,
  split), ``lateral_convs``; the RepNCSPELAN4 ``fpn_blocks`` / ``pan_blocks`` ``cv1``, ``cv2`` =
  Sequential(CSPLayer, ConvNormLayer) (kd_detr ``csp_rep1`` and ``conv2``), ``cv3`` likewise
  (``csp_rep2``, ``conv3``), ``cv4`` (``conv4``); ``downsample_convs.N.0`` SCDown ``cv1`` /
  ``cv2`` (``conv1`` / ``conv2``).
- decoder: RT-DETRv2's layout without ``norm2`` / ``value_proj`` / ``output_proj`` and with the
  ``gateway`` (gate + norm), ``decoder.decoder.lqe_layers``, ``decoder.pre_bbox_head`` and the
  ``reg_scale`` / ``up`` parameters, registered twice (``decoder.decoder.*`` and ``decoder.*``:
  the copies must be equal). ``num_points_scale``, ``anchors`` / ``valid_mask`` are dropped.

Classes: as RT-DETR's (80 contiguous COCO classes in Detectron2's order; Objects365 models have
366 rows and need a config with that many classes).
"""
import re
from typing import Dict

import torch

from .hf_backbones import hf_hgnetv2_key
from .official_rt_detr import (
    _DEC,
    _DEC_OUT,
    _ENC,
    _ENC_OUT,
    _NORM,
    _P,
    _drop,
    add_norm_counters,
    finish_rt_detr_family,
    select_official_weights,
)
from .registry import register_checkpoint_converter
from .rename import Tied, rename_keys, split_packed_qkv

__all__ = ["D_FINE_RULES", "convert_official_d_fine"]


def _hgnetv2(match, value):
    key = match[1]
    key = re.sub(r"^stem\.", "embedder.", key)
    key = re.sub(r"^stages\.", "encoder.stages.", key)
    key = re.sub(r"\.conv\.weight$", ".convolution.weight", key)
    key = re.sub(r"\.bn\.(\w+)$", r".normalization.\1", key)
    new = hf_hgnetv2_key(key)
    if new is None:
        raise ValueError(f"{match.string}: not a key of kd_detr's HGNetV2 (as {key!r})")
    return {"backbone." + new: value}


def _csp_layer(match, value):
    """``cv2.0`` / ``cv3.0`` (the CSPLayer of RepNCSPELAN4's second / third branch)."""
    blocks, index, branch, rest = match.group(1, 2, 3, 4)
    return {f"encoder.{blocks}.{index}.csp_rep{int(branch) - 1}.{rest}": value}


_ELAN = r"encoder\.(fpn_blocks|pan_blocks)\.(\d+)\."
D_FINE_RULES = [
    (r"backbone\.((?:stem|stages)\..+)", _hgnetv2),
    (rf"encoder\.input_proj\.(\d+)\.conv\.{_P}", r"input_proj.\1.0.\2"),
    (rf"encoder\.input_proj\.(\d+)\.norm\.{_NORM}", r"input_proj.\1.1.\2"),
    (_ENC + rf"self_attn\.in_proj_{_P}", split_packed_qkv(_ENC_OUT + "self_attn")),
    (_ENC + r"(self_attn\.out_proj|norm[12])\.(.+)", _ENC_OUT + r"\3.\4"),
    (_ENC + r"linear([12])\.(.+)", _ENC_OUT + r"ffn.linear\3.\4"),
    (r"encoder\.lateral_convs\.(.+)", r"encoder.lateral_convs.\1"),
    (_ELAN + r"cv([14])\.(.+)", r"encoder.\1.\2.conv\3.\4"),
    (_ELAN + r"cv([23])\.0\.(.+)", _csp_layer),
    (_ELAN + r"cv([23])\.1\.(.+)", r"encoder.\1.\2.conv\3.\4"),
    (
        r"encoder\.downsample_convs\.(\d+)\.0\.cv([12])\.(.+)",
        r"encoder.downsample_convs.\1.conv\2.\3",
    ),
    (r"encoder\.pos_embed\d+", _drop),
    (rf"decoder\.input_proj\.(\d+)\.conv\.{_P}", r"decoder_input_proj.\1.0.\2"),
    (rf"decoder\.input_proj\.(\d+)\.norm\.{_NORM}", r"decoder_input_proj.\1.1.\2"),
    (_DEC + rf"self_attn\.in_proj_{_P}", split_packed_qkv(_DEC_OUT + "self_attn")),
    (_DEC + r"cross_attn\.num_points_scale", _drop),
    (
        _DEC + r"(self_attn\.out_proj|norm[13]|gateway\.(?:gate|norm)|"
        r"cross_attn\.(?:sampling_offsets|attention_weights))\.(.+)",
        _DEC_OUT + r"\2.\3",
    ),
    (_DEC + r"linear([12])\.(.+)", _DEC_OUT + r"ffn.linear\2.\3"),
    (r"decoder\.decoder\.lqe_layers\.(.+)", r"transformer.lqe_layers.\1"),
    (r"decoder\.decoder\.(reg_scale|up)", r"transformer.\1"),
    (r"decoder\.(reg_scale|up)", Tied(r"decoder.decoder.\1")),
    (r"decoder\.pre_bbox_head\.(.+)", r"transformer.pre_bbox_head.\1"),
    (r"decoder\.denoising_class_embed\.weight", "denoising.label_enc.weight"),
    (r"decoder\.tgt_embed\.weight", "tgt_embed.weight"),
    (r"decoder\.query_pos_head\.(.+)", r"transformer.query_pos_head.\1"),
    (rf"decoder\.enc_output\.proj\.{_P}", r"enc_output.0.\1"),
    (rf"decoder\.enc_output\.norm\.{_P}", r"enc_output.1.\1"),
    (r"decoder\.(enc_score_head|enc_bbox_head)\.(.+)", r"\1.\2"),
    (r"decoder\.dec_score_head\.(\d+)\.(.+)", r"class_embed.\1.\2"),
    (r"decoder\.dec_bbox_head\.(\d+)\.(.+)", r"bbox_embed.\1.\2"),
    (r"decoder\.(anchors|valid_mask)", _drop),
]


@register_checkpoint_converter("d_fine")
def convert_official_d_fine(source, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """Peterande/D-FINE checkpoint (path or mapping) -> kd_detr ``DFINE`` state dict."""
    if cfg.MODEL.META_ARCHITECTURE != "DFINE":
        raise ValueError(f"--source d_fine needs a DFINE config, got {cfg.MODEL.META_ARCHITECTURE}")
    state = select_official_weights(source, "Peterande/D-FINE")
    if not any(k.startswith("decoder.pre_bbox_head.") for k in state) or not any(
        k.startswith("backbone.stages.") for k in state
    ):
        raise ValueError(
            "not a Peterande/D-FINE HGNetv2 checkpoint: no decoder.pre_bbox_head.* or "
            "backbone.stages.* keys (RT-DETR checkpoints: --source rt_detr)"
        )
    state = rename_keys(state, D_FINE_RULES, "Peterande/D-FINE")
    add_norm_counters(state, cfg.MODEL.HGNETV2.NORM)
    return finish_rt_detr_family(state, cfg, coco_classes)
