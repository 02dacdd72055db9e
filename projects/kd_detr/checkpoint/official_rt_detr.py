# Copyright (c) kd_detr contributors.
"""lyuwenyu/RT-DETR checkpoints (``--source rt_detr``): ``rtdetr_pytorch`` (v1) and
``rtdetrv2_pytorch`` (v2) with the PResNet (ResNet-vd) backbone.

Layout (read from ``src/nn/backbone/presnet.py``, ``src/zoo/rtdetr/hybrid_encoder.py``,
``rtdetr_decoder.py`` and ``rtdetrv2_decoder.py``):

- the file is the solver's state, ``{"ema": {"module": state_dict, "updates": n}, "model":
  state_dict, "optimizer": ..., ...}`` or only one of "ema" / "model". The EMA weights are
  preferred (they are what the repository evaluates and releases); "model" is used only when
  there is no "ema". The log says which.
- backbone ``backbone.conv1.conv1_{1,2,3}`` (deep stem) and ``backbone.res_layers.S.blocks.B``
  with ``branch2{a,b,c}`` (conv1..3) and ``short`` (a ConvNormLayer, or for the strided
  variant-d shortcut a Sequential(pool, conv=ConvNormLayer): ``short.conv.conv``), each a
  ConvNormLayer (``.conv``, ``.norm``): kd_detr's ``ResNetVD`` (``res{S+2}``).
- ``encoder.input_proj.L`` = Sequential(Conv2d, BatchNorm2d) in v1 (``.0`` / ``.1``) and
  Sequential(conv=, norm=) in v2; ``encoder.encoder.I.layers.J`` are the AIFI transformer layers
  (a packed ``nn.MultiheadAttention`` ``self_attn.in_proj_*``, rows q, k, v, split here;
  ``linear1/2``, ``norm1/2``); ``lateral_convs``, ``fpn_blocks``, ``downsample_convs`` and
  ``pan_blocks`` have kd_detr's names already. ``pos_embed*`` (eval-size position embeddings)
  are non-persistent and dropped if present.
- ``decoder.input_proj.L`` (conv=, norm=); ``decoder.decoder.layers.N`` (packed self-attention,
  ``norm1``, ``cross_attn`` MSDeformableAttention, ``norm2``, ``linear1/2``, ``norm3``); v2's
  ``cross_attn.num_points_scale`` buffer (1 / points, derived from the config) is dropped and is
  how v2 is told from v1. ``decoder.denoising_class_embed`` (num_classes + 1 rows, the last the
  padding index), ``decoder.tgt_embed`` (learned queries), ``decoder.query_pos_head``,
  ``decoder.enc_output`` (v1: Sequential(Linear, LayerNorm); v2: proj=, norm=),
  ``decoder.enc_score_head`` / ``enc_bbox_head``, one head per layer ``decoder.dec_score_head.N``
  / ``dec_bbox_head.N``. v2 registers ``decoder.anchors`` / ``decoder.valid_mask`` as buffers
  when ``eval_spatial_size`` is set (v1 keeps them as plain attributes): kd_detr computes them
  from the feature sizes, so they are dropped.

Classes: the COCO models are trained with ``num_classes`` 80 and their dataset maps COCO
category ids to contiguous labels in increasing id order (``mscoco_category2label``;
``remap_mscoco_category`` maps them back at inference), which is Detectron2's order of the 80
COCO classes: the 80 rows are used as they are (no 91-slot mapping; ``--coco-classes map`` is
accepted only for 80-row heads and changes nothing). Other class counts must equal
MODEL.DETR.NUM_CLASSES (e.g. Objects365 pre-training has 366 rows).

Not in the weights and so not checked: v2's ``cross_attn_method`` (MODEL.RTDETR.SAMPLING_METHOD)
and ``num_queries`` without learned queries; ``tools/convert_checkpoint.py`` still checks every
converted key and shape against the model it builds.
"""
import logging
from typing import Dict, Mapping

import torch

from .registry import register_checkpoint_converter
from .rename import check_hidden_size, load_state_dict, rename_keys, split_packed_qkv

__all__ = ["RT_DETR_RULES", "convert_official_rt_detr", "select_official_weights"]

logger = logging.getLogger(__name__)

_P = r"(weight|bias)"
_NORM = r"(weight|bias|running_mean|running_var)"
_BLOCK = r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\."
_ENC = r"encoder\.encoder\.(\d+)\.layers\.(\d+)\."
_ENC_OUT = r"encoder.aifi.\1.layers.\2."
_DEC = r"decoder\.decoder\.layers\.(\d+)\."
_DEC_OUT = r"transformer.layers.\1."
_BRANCH = {"a": 1, "b": 2, "c": 3}


def _drop(match, value):
    return {}


def _block_conv(match, value):
    stage, block, branch, rest = match.group(1, 2, 3, 4)
    return {f"backbone.res{int(stage) + 2}.{block}.conv{_BRANCH[branch]}.{rest}": value}


def _block_shortcut(match, value):
    stage, block, rest = match.group(1, 2, 3)
    return {f"backbone.res{int(stage) + 2}.{block}.shortcut.{rest}": value}


RT_DETR_RULES = [
    # backbone (PResNet) -> ResNetVD
    (r"backbone\.conv1\.conv1_([123])\.conv\.weight", r"backbone.stem.conv\1.weight"),
    (rf"backbone\.conv1\.conv1_([123])\.norm\.{_NORM}", r"backbone.stem.conv\1.norm.\2"),
    (_BLOCK + r"branch2([abc])\.conv\.(weight)", _block_conv),
    (_BLOCK + rf"branch2([abc])\.(norm\.{_NORM})", _block_conv),
    (_BLOCK + r"short\.(?:conv\.)?conv\.(weight)", _block_shortcut),
    (_BLOCK + rf"short\.(?:conv\.)?(norm\.{_NORM})", _block_shortcut),
    # hybrid encoder
    (rf"encoder\.input_proj\.(\d+)\.(?:0|conv)\.{_P}", r"input_proj.\1.0.\2"),
    (rf"encoder\.input_proj\.(\d+)\.(?:1|norm)\.{_NORM}", r"input_proj.\1.1.\2"),
    (_ENC + rf"self_attn\.in_proj_{_P}", split_packed_qkv(_ENC_OUT + "self_attn")),
    (_ENC + r"(self_attn\.out_proj|norm[12])\.(.+)", _ENC_OUT + r"\3.\4"),
    (_ENC + r"linear([12])\.(.+)", _ENC_OUT + r"ffn.linear\3.\4"),
    (r"encoder\.(lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\.(.+)", r"encoder.\1.\2"),
    (r"encoder\.pos_embed\d+", _drop),
    # decoder
    (rf"decoder\.input_proj\.(\d+)\.(?:0|conv)\.{_P}", r"decoder_input_proj.\1.0.\2"),
    (rf"decoder\.input_proj\.(\d+)\.(?:1|norm)\.{_NORM}", r"decoder_input_proj.\1.1.\2"),
    (_DEC + rf"self_attn\.in_proj_{_P}", split_packed_qkv(_DEC_OUT + "self_attn")),
    (_DEC + r"cross_attn\.num_points_scale", _drop),
    (
        _DEC + r"(self_attn\.out_proj|norm[123]|cross_attn\.(?:sampling_offsets|"
        r"attention_weights|value_proj|output_proj))\.(.+)",
        _DEC_OUT + r"\2.\3",
    ),
    (_DEC + r"linear([12])\.(.+)", _DEC_OUT + r"ffn.linear\2.\3"),
    (r"decoder\.denoising_class_embed\.weight", "denoising.label_enc.weight"),
    (r"decoder\.tgt_embed\.weight", "tgt_embed.weight"),
    (r"decoder\.query_pos_head\.(.+)", r"transformer.query_pos_head.\1"),
    (rf"decoder\.enc_output\.(?:0|proj)\.{_P}", r"enc_output.0.\1"),
    (rf"decoder\.enc_output\.(?:1|norm)\.{_P}", r"enc_output.1.\1"),
    (r"decoder\.(enc_score_head|enc_bbox_head)\.(.+)", r"\1.\2"),
    (r"decoder\.dec_score_head\.(\d+)\.(.+)", r"class_embed.\1.\2"),
    (r"decoder\.dec_bbox_head\.(\d+)\.(.+)", r"bbox_embed.\1.\2"),
    (r"decoder\.(anchors|valid_mask)", _drop),
]


def select_official_weights(source, repository: str) -> Dict[str, torch.Tensor]:
    """The state dict of a lyuwenyu/RT-DETR or Peterande/D-FINE checkpoint (path or mapping):
    ``ema.module`` when present (logged), else ``model``, else the mapping itself."""
    if isinstance(source, str):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (re-raised with the path)
            raise ValueError(
                f"Could not read {source!r} as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                f"pass a .pth file of {repository}"
            ) from e
    if isinstance(source, Mapping):
        ema = source.get("ema")
        if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping) and ema["module"]:
            logger.info("%s checkpoint: using the EMA weights ('ema.module')", repository)
            return load_state_dict(dict(ema["module"]))
        if isinstance(source.get("model"), Mapping):
            logger.info("%s checkpoint: no EMA weights, using 'model'", repository)
    return load_state_dict(source)


def add_norm_counters(state: Dict[str, torch.Tensor], backbone_norm: str) -> None:
    """Add zero ``num_batches_tracked`` counters (dropped by renaming) for every BatchNorm of
    ``state``; the backbone's only when it is not frozen (``backbone_norm`` != "FrozenBN")."""
    zero = torch.zeros((), dtype=torch.long)
    for key in [k for k in state if k.endswith(".running_mean")]:
        if key.startswith("backbone.") and backbone_norm == "FrozenBN":
            continue
        state[key[: -len("running_mean")] + "num_batches_tracked"] = zero.clone()


def check_class_rows(state: Dict[str, torch.Tensor], cfg, coco_classes: str) -> None:
    """Class heads must have MODEL.DETR.NUM_CLASSES rows, the denoising label embedding one more
    (the padding row); ``coco_classes``: see the module docstring."""
    if coco_classes not in ("auto", "map", "keep"):
        raise ValueError(f"coco_classes must be 'auto', 'map' or 'keep', got {coco_classes!r}")
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    for key, value in sorted(state.items()):
        is_label = key == "denoising.label_enc.weight"
        if not (is_label or key.startswith(("class_embed.", "enc_score_head."))):
            continue
        expected = num_classes + int(is_label)
        if coco_classes == "map" and value.shape[0] != 80 + int(is_label):
            raise ValueError(
                f"--coco-classes map: {key} has {value.shape[0]} rows, not COCO's 80 contiguous "
                "classes" + (" + padding" if is_label else "")
            )
        if value.shape[0] != expected:
            raise ValueError(
                f"class count: {key} has {value.shape[0]} rows but the model expects {expected} "
                f"(MODEL.DETR.NUM_CLASSES={num_classes}"
                + (" + the padding row)" if is_label else ")")
            )


def finish_rt_detr_family(state: Dict[str, torch.Tensor], cfg, coco_classes: str) -> Dict:
    """Checks shared by the RT-DETR and D-FINE converters (queries, hidden size, classes, DN)."""
    d, r = cfg.MODEL.DETR, cfg.MODEL.RTDETR
    check_hidden_size(state, cfg, "enc_output.0.weight")
    queries = state.get("tgt_embed.weight")
    if (queries is not None) != bool(r.LEARN_INITIAL_QUERY):
        raise ValueError(
            "learned queries: the checkpoint "
            + ("has" if queries is not None else "has no")
            + f" decoder.tgt_embed but MODEL.RTDETR.LEARN_INITIAL_QUERY={r.LEARN_INITIAL_QUERY}"
        )
    if queries is not None and queries.shape[0] != d.NUM_QUERIES:
        raise ValueError(
            f"queries: tgt_embed.weight has {queries.shape[0]} rows but "
            f"MODEL.DETR.NUM_QUERIES={d.NUM_QUERIES}"
        )
    label_key = "denoising.label_enc.weight"
    if label_key in state and not d.DN.ENABLED:
        logger.info("Dropping %s: denoising is off (MODEL.DETR.DN.ENABLED False)", label_key)
        del state[label_key]
    check_class_rows(state, cfg, coco_classes)
    return state


@register_checkpoint_converter("rt_detr")
def convert_official_rt_detr(source, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """lyuwenyu/RT-DETR v1 / v2 checkpoint (path or mapping) -> kd_detr ``RTDETR`` state dict."""
    if cfg.MODEL.META_ARCHITECTURE != "RTDETR":
        raise ValueError(
            f"--source rt_detr needs an RTDETR config, got {cfg.MODEL.META_ARCHITECTURE}"
        )
    state = select_official_weights(source, "lyuwenyu/RT-DETR")
    if not any(k.startswith("backbone.res_layers.") for k in state):
        raise ValueError(
            "not a lyuwenyu/RT-DETR PResNet checkpoint: no backbone.res_layers.* keys "
            "(HGNetv2 / other backbones are not supported)"
        )
    scales = [v for k, v in state.items() if k.endswith("cross_attn.num_points_scale")]
    version = 2 if scales else 1
    if version != cfg.MODEL.RTDETR.VERSION:
        raise ValueError(
            f"the checkpoint is RT-DETR v{version} (rtdetr{'v2' if scales else ''}_pytorch: "
            f"{'has' if scales else 'no'} cross_attn.num_points_scale buffers) but "
            f"MODEL.RTDETR.VERSION={cfg.MODEL.RTDETR.VERSION}"
        )
    if scales:
        r = cfg.MODEL.RTDETR
        points = list(r.DEC_N_POINTS)
        points = points * r.NUM_FEATURE_LEVELS if len(points) == 1 else points
        theirs = [round(1.0 / float(s)) for s in scales[0] if s > 0]
        if sorted(set(theirs)) != sorted(set(points)) or len(theirs) != sum(points):
            raise ValueError(
                f"sampling points: num_points_scale has {len(theirs)} entries (points "
                f"{sorted(set(theirs))}) but MODEL.RTDETR.DEC_N_POINTS={list(r.DEC_N_POINTS)} "
                f"over {r.NUM_FEATURE_LEVELS} levels"
            )
    state = rename_keys(state, RT_DETR_RULES, f"lyuwenyu/RT-DETR v{version}")
    add_norm_counters(state, cfg.MODEL.RESNET_VD.NORM)
    return finish_rt_detr_family(state, cfg, coco_classes)
