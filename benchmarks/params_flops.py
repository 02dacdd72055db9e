#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Parameters and inference FLOPs of every kd_detr DETR-family variant and backbone.

Every (variant, backbone) pair is built from its recipe with random weights (no pretrained
backbone is loaded), and fvcore's ``FlopCountAnalysis`` traces ``forward_raw`` on one image of
``--size`` (default 800x1333, no padding), from the normalised image to every decoder layer's
class and box heads (no postprocessing). A markdown table is printed to stdout.

Counting conventions (fvcore's): one FLOP is one multiply-add. Convolutions, linear layers,
matmuls and norms use fvcore's handles. Added here:

* ``aten::scaled_dot_product_attention``: the two matmuls, ``B * heads * Lq * Lk * (Dqk + Dv)``
  (per-head widths), as fvcore counts the same attention written with ``@``; the softmax is
  not counted.
* ``aten::grid_sampler`` (deformable attention's sampling): per output value, 4 multiply-adds
  for bilinear interpolation (fvcore's default assumes bilinear), 1 for nearest, 16 for bicubic.
* ``aten::prelu``, ``aten::sigmoid``, ``aten::softmax`` and other elementwise, indexing and
  sorting ops (``ELEMENTWISE_OPS``): not counted, as fvcore / Detectron2 skip ReLU and other
  elementwise ops; they are a small fraction of the total.

Parameters: ``sum(p.numel() for p in model.parameters())``, frozen backbone stages included
(FrozenBatchNorm statistics are buffers, not parameters).

Usage:
    python benchmarks/params_flops.py [--size 800x1333] [--variants ...] [--backbones ...]
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import logging
import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Variant -> (recipe, extra overrides). DN-DAB-DETR has DAB-DETR's inference graph (denoising
# queries exist only in training) plus the label embedding of the noised ground truth.
VARIANTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "DETR": ("configs/detr/detr_R_50_500ep_coco.yaml", ()),
    "DAB-DETR": ("configs/dab_detr/dab_detr_R_50_50ep_coco.yaml", ()),
    "DN-DAB-DETR": ("configs/dab_detr/dn_dab_detr_R_50_50ep_coco.yaml", ()),
    "Deformable DETR": ("configs/deformable_detr/deformable_detr_R_50_50ep_coco.yaml", ()),
    "Deformable DETR + box refine": (
        "configs/deformable_detr/deformable_detr_box_refine_R_50_50ep_coco.yaml",
        (),
    ),
    "Deformable DETR two-stage": (
        "configs/deformable_detr/deformable_detr_two_stage_R_50_50ep_coco.yaml",
        (),
    ),
    "DINO": ("configs/dino/dino_R_50_4scale_12ep_coco.yaml", ()),
    # RT-DETR(v2): the R50vd recipes; R18 / R50 / R101 are ResNet-vd (MODEL.RESNET_VD.DEPTH) with
    # the rest of the R50vd recipe (the R18vd / R34vd recipes also shrink the CSP width and the
    # decoder: configs/rt_detr/).
    "RT-DETR": ("configs/rt_detr/rt_detr_r50vd_6x_coco.yaml", ()),
    "RT-DETRv2": ("configs/rt_detr/rt_detrv2_r50vd_6x_coco.yaml", ()),
    # D-FINE: its own HGNetv2 recipes (the backbone column names the HGNetv2 size; ResNet /
    # EfficientNet-Lite backbones are not swapped in).
    "D-FINE-N": ("configs/d_fine/dfine_hgnetv2_n_coco.yaml", ()),
    "D-FINE-S": ("configs/d_fine/dfine_hgnetv2_s_coco.yaml", ()),
    "D-FINE-M": ("configs/d_fine/dfine_hgnetv2_m_coco.yaml", ()),
    "D-FINE-L": ("configs/d_fine/dfine_hgnetv2_l_coco.yaml", ()),
}
# Variants measured with their own backbone only (named in the table's backbone column).
FIXED_BACKBONES = {
    "D-FINE-N": "HGNetv2-B0",
    "D-FINE-S": "HGNetv2-B0",
    "D-FINE-M": "HGNetv2-B2",
    "D-FINE-L": "HGNetv2-B4",
}
SINGLE_SCALE_ARCHS = ("DETR", "DABDETR")  # one stride-32 map; the others read strides 8/16/32
BACKBONES = ("R18", "R50", "R101", "EfficientNet-Lite0", "EfficientNet-Lite2")
# Ops that carry no multiply-adds worth counting (elementwise, activation, indexing, sorting).
ELEMENTWISE_OPS = (
    "aten::__or__",
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::rsub",
    "aten::mul",
    "aten::mul_",
    "aten::div",
    "aten::div_",
    "aten::neg",
    "aten::exp",
    "aten::log",
    "aten::sqrt",
    "aten::rsqrt",
    "aten::pad",
    "aten::pow",
    "aten::sin",
    "aten::cos",
    "aten::sigmoid",
    "aten::sigmoid_",
    "aten::softmax",
    "aten::prelu",
    "aten::silu",
    "aten::silu_",
    "aten::hardtanh",
    "aten::hardtanh_",
    "aten::gelu",
    "aten::cumsum",
    "aten::sum",
    "aten::mean",
    "aten::topk",
    "aten::sort",
    "aten::argsort",
    "aten::where",
    "aten::logical_not",
    "aten::logical_and",
    "aten::log_sigmoid",
    "aten::abs",
    "aten::all",
    "aten::any",
    "aten::lt",
    "aten::le",
    "aten::ne",
    "aten::flip",
    "aten::reciprocal",
    "aten::repeat",
    "aten::stack",
    "aten::split",
    "aten::split_with_sizes",
    "aten::unbind",
    "aten::masked_fill_",
    "aten::max_pool2d",
    "aten::embedding",
    "aten::repeat_interleave",
    "aten::linspace",
    "aten::meshgrid",
    "aten::zeros_like",
    "aten::ones_like",
    "aten::fill_",
    "aten::to",
    "aten::type_as",
    "aten::unflatten",
)


def _shape(value) -> List[int]:
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(value)
    if shape is None:
        raise RuntimeError(f"fvcore could not read the shape of {value}: trace with real tensors")
    return list(shape)


def sdpa_flop_jit(inputs, outputs) -> int:
    """``scaled_dot_product_attention(q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev))``:
    ``prod(...) * Lq * Lk * (E + Ev)`` multiply-adds (q @ k^T and weights @ v)."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = 1
    for n in q[:-2]:
        batch *= n
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


# torch.nn.functional.grid_sample's interpolation_mode argument -> multiply-adds per output.
_GRID_SAMPLE_COST = {0: 4, 1: 1, 2: 16}  # bilinear, nearest, bicubic


def grid_sampler_flop_jit(inputs, outputs) -> int:
    """``grid_sampler(input, grid, mode, padding, align_corners)``: output numel times 4
    (bilinear), 1 (nearest) or 16 (bicubic)."""
    mode = inputs[2].toIValue() if len(inputs) > 2 else 0
    numel = 1
    for n in _shape(outputs[0]):
        numel *= n
    return numel * _GRID_SAMPLE_COST.get(mode, 4)


class RawOutputs(nn.Module):
    """``model.forward_raw((images, mask))`` as a traceable module returning
    (logits (B, Q, K), boxes (B, Q, 4)) of the last decoder layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        out = self.model.forward_raw((images, mask))
        return out["pred_logits"], out["pred_boxes"]


def flop_counter(model: nn.Module, height: int, width: int):
    """fvcore ``FlopCountAnalysis`` of ``model.forward_raw`` on one (1, 3, H, W) image, with the
    handles described in the module docstring, traced under ``torch.no_grad`` (warnings off;
    see ``unsupported_ops()``)."""
    from fvcore.nn import FlopCountAnalysis

    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    analysis = FlopCountAnalysis(RawOutputs(model.eval()), (images, mask))
    analysis.set_op_handle(
        "aten::scaled_dot_product_attention", sdpa_flop_jit,
        "aten::grid_sampler", grid_sampler_flop_jit,
        **{op: None for op in ELEMENTWISE_OPS},
    )  # fmt: skip
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with torch.no_grad():  # inference graph (Detectron2's FrozenBN is F.batch_norm only here)
        analysis.total()  # traces now; the results are cached
    return analysis


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_opts(backbone: str, multi_scale: bool, arch: str = "") -> List[str]:
    """Config overrides that put ``backbone`` under a recipe (single-scale: its stride-32 map;
    multi-scale: its stride 8/16/32 maps). EfficientNet-Lite is built without its weights.
    ``arch`` "RTDETR": ResNets are ResNet-vd and the encoder reads MODEL.RTDETR.IN_FEATURES."""
    depth = {"R18": 18, "R50": 50, "R101": 101}
    if backbone.startswith("HGNetv2"):  # a D-FINE recipe's own backbone
        return []
    if arch == "RTDETR" and backbone in depth:
        return ["MODEL.RESNET_VD.DEPTH", str(depth[backbone])]
    if backbone in depth:
        return ["MODEL.RESNETS.DEPTH", str(depth[backbone])] + (
            ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"] if depth[backbone] < 50 else []
        )
    if not backbone.startswith("EfficientNet-Lite"):
        raise ValueError(f"Unknown backbone {backbone!r}; choose from {list(BACKBONES)}")
    stages = ["stage3", "stage4", "stage5"] if multi_scale else ["stage5"]
    opts = [
        "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone",
        "MODEL.EFFICIENTNET_LITE.NAME", "efficientnet_lite" + backbone[-1],
        "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
        "MODEL.EFFICIENTNET_LITE.OUT_FEATURES", str(stages),
    ]  # fmt: skip
    if arch == "RTDETR":
        return opts + ["MODEL.RTDETR.IN_FEATURES", str(stages)]
    if multi_scale:
        return opts + ["MODEL.DETR.DEFORMABLE.IN_FEATURES", str(stages)]
    return opts + ["MODEL.DETR.IN_FEATURE", "stage5"]


def build_cfg(variant: str, backbone: str, config_file: Optional[str] = None, opts=()):
    """Frozen config of ``variant`` (its recipe, or ``config_file``) with ``backbone``."""
    from kd_detr.config import load_config

    recipe, variant_opts = VARIANTS[variant] if config_file is None else (config_file, ())
    cfg = load_config(os.path.join(ROOT, recipe), freeze=False)
    multi_scale = cfg.MODEL.META_ARCHITECTURE not in SINGLE_SCALE_ARCHS
    cfg.merge_from_list(
        list(variant_opts)
        + backbone_opts(backbone, multi_scale, cfg.MODEL.META_ARCHITECTURE)
        + list(opts)
        + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    )
    cfg.freeze()
    return cfg


def measure(cfg, height: int, width: int) -> Dict[str, float]:
    """Parameters and FLOPs of the model of ``cfg`` (whole model and its backbone).

    Returns:
        dict: "params", "backbone_params", "flops", "backbone_flops", "unsupported" (fvcore's
        unsupported op names -> call counts).
    """
    from detectron2.modeling import build_model

    model = build_model(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = flop_counter(model, height, width)
    by_module = analysis.by_module()
    unsupported = dict(analysis.unsupported_ops())
    return {
        "params": count_parameters(model),
        "backbone_params": count_parameters(model.backbone),
        "flops": analysis.total(),
        "backbone_flops": by_module.get("model.backbone", 0),
        "unsupported": unsupported,
    }


def available_variants(names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(variants that can be built here, skip messages): a variant is skipped when its recipe
    or its meta-architecture does not exist in this checkout (e.g. DINO before it is merged)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from kd_detr.config import load_config

    ok, skipped = [], []
    for name in names:
        recipe = VARIANTS[name][0]
        if not os.path.isfile(os.path.join(ROOT, recipe)):
            skipped.append(f"{name}: recipe {recipe} not found")
            continue
        cfg = load_config(os.path.join(ROOT, recipe))
        if cfg.MODEL.META_ARCHITECTURE not in META_ARCH_REGISTRY:
            skipped.append(f"{name}: meta-architecture {cfg.MODEL.META_ARCHITECTURE} not found")
        else:
            ok.append(name)
    return ok, skipped


def markdown_table(rows: List[Dict], height: int, width: int) -> str:
    lines = [
        f"| Model | Backbone | Params (M) | Backbone params (M) | GFLOPs ({height}x{width}) "
        "| Backbone GFLOPs |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['backbone']} | {r['params'] / 1e6:.2f} | "
            f"{r['backbone_params'] / 1e6:.2f} | {r['flops'] / 1e9:.1f} | "
            f"{r['backbone_flops'] / 1e9:.1f} |"
        )
    return "\n".join(lines)


def parse_size(text: str) -> Tuple[int, int]:
    """"800x1333" -> (800, 1333) (height x width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be HEIGHTxWIDTH like 800x1333, not {text!r}")
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"--size must be at least 32x32, got {text!r}")
    return height, width


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=parse_size, default=(800, 1333), help="HEIGHTxWIDTH")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    return parser


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    height, width = args.size
    variants, skipped = available_variants(args.variants)
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    rows, unsupported = [], {}
    for variant in variants:
        fixed = FIXED_BACKBONES.get(variant)
        for backbone in [fixed] if fixed else args.backbones:
            result = measure(build_cfg(variant, backbone), height, width)
            unsupported.update(result.pop("unsupported"))
            rows.append(dict(result, variant=variant, backbone=backbone))
            print(f"measured {variant} / {backbone}", file=sys.stderr, flush=True)
    print(markdown_table(rows, height, width))
    if unsupported:
        print(f"\nNot counted (no handle): {sorted(unsupported)}")
    return rows


if __name__ == "__main__":
    main()
