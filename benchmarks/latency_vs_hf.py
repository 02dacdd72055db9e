#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Inference latency of kd_detr's DETR-family models against Hugging Face's, same weights.

For every model, the Hugging Face detector is built with random weights (a realistic config:
timm ResNet-50, d 256, 6 + 6 layers, the paper's query count; or ``--preset tiny``), saved with
``save_pretrained``, converted by our ``--source hf`` converter and loaded into the kd_detr model
built from our recipe. Both then run on the same normalised input (batch 1, square ``--size``,
no padding, CPU, eval mode, ``torch.inference_mode``): their final logits and boxes are compared
(max abs diff), and their latencies are measured in one interleaved loop (``--warmup`` untimed
rounds, then ``--reps`` rounds; each round times both models, alternating which goes first, so
both see the same machine load). Printed per model, on one line:

    model=<name> ours_ms=<median> hf_ms=<median> ratio=<ours/hf> max_abs_diff=<...> ...

What is timed: ``model.forward_raw((images, mask))`` (backbone to every decoder layer's heads)
and ``hf(pixel_values=..., pixel_mask=...)`` (backbone to the final heads); neither includes
image preprocessing or postprocessing.

Usage:
    python benchmarks/latency_vs_hf.py [--models detr dab_detr deformable_detr
        deformable_detr_two_stage] [--size 512] [--reps 10] [--warmup 2] [--threads N]
        [--preset paper|tiny] [--profile]
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import contextlib
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A kd_detr model and its Hugging Face twin.

    Attributes:
        hf_class: ``transformers`` model class name.
        hf_config: ``transformers`` config class name.
        config_file: kd_detr recipe (relative to the repository) of the ``paper`` preset.
        tiny_config_file: kd_detr config of the ``tiny`` preset.
        hf_kwargs: Hugging Face config arguments shared by both presets (variant switches).
        opts: kd_detr config overrides shared by both presets.
        paper_opts: kd_detr overrides of the ``paper`` preset only.
        perturb_backbone: also perturb the backbone's weights. RT-DETR's ResNet-50-vd with
            perturbed weights reaches activations of 1e6 and more, whose float32 rounding
            drowns the comparison; its backbone keeps transformers' initialisation.
    """

    hf_class: str
    hf_config: str
    config_file: str
    tiny_config_file: str
    hf_kwargs: Tuple[Tuple[str, object], ...] = ()
    opts: Tuple[str, ...] = ()
    paper_opts: Tuple[str, ...] = ()
    perturb_backbone: bool = True


_DEFORMABLE = dict(
    hf_class="DeformableDetrForObjectDetection",
    hf_config="DeformableDetrConfig",
    config_file="configs/deformable_detr/deformable_detr_R_50_50ep_coco.yaml",
    tiny_config_file="configs/tests/deformable_detr_tiny_parity.yaml",
)
_REFINE = ("MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True")

MODELS: Dict[str, ModelSpec] = {
    "detr": ModelSpec(
        hf_class="DetrForObjectDetection",
        hf_config="DetrConfig",
        config_file="configs/detr/detr_R_50_500ep_coco.yaml",
        tiny_config_file="configs/tests/detr_tiny_parity.yaml",
        hf_kwargs=(("auxiliary_loss", False),),
    ),
    "dab_detr": ModelSpec(
        hf_class="DabDetrForObjectDetection",
        hf_config="DabDetrConfig",
        config_file="configs/dab_detr/dab_detr_R_50_50ep_coco.yaml",
        tiny_config_file="configs/tests/dab_detr_tiny_parity.yaml",
        # Hugging Face clamps inverse_sigmoid at 1e-5 (the official code at 1e-3).
        paper_opts=("MODEL.DETR.DAB.INVERSE_SIGMOID_EPS", "1e-5"),
    ),
    "deformable_detr": ModelSpec(**_DEFORMABLE),
    "deformable_detr_box_refine": ModelSpec(
        **_DEFORMABLE, hf_kwargs=(("with_box_refine", True),), opts=_REFINE
    ),
    "deformable_detr_two_stage": ModelSpec(
        **_DEFORMABLE,
        hf_kwargs=(("with_box_refine", True), ("two_stage", True)),
        opts=_REFINE + ("MODEL.DETR.DEFORMABLE.TWO_STAGE", "True"),
    ),
    "rt_detr": ModelSpec(
        hf_class="RTDetrForObjectDetection",
        hf_config="RTDetrConfig",
        config_file="configs/rt_detr/rt_detr_r50vd_6x_coco.yaml",
        tiny_config_file="configs/tests/rt_detr_tiny_parity.yaml",
        perturb_backbone=False,
    ),
    "rt_detr_v2": ModelSpec(
        hf_class="RTDetrV2ForObjectDetection",
        hf_config="RTDetrV2Config",
        config_file="configs/rt_detr/rt_detrv2_r50vd_6x_coco.yaml",
        tiny_config_file="configs/tests/rt_detr_tiny_parity.yaml",
        opts=("MODEL.RTDETR.VERSION", "2"),
        perturb_backbone=False,
    ),
    "d_fine": ModelSpec(
        hf_class="DFineForObjectDetection",
        hf_config="DFineConfig",
        config_file="configs/d_fine/dfine_hgnetv2_l_coco.yaml",
        tiny_config_file="configs/tests/dfine_tiny_parity.yaml",
        perturb_backbone=False,
    ),
}
DEFAULT_MODELS = ("detr", "dab_detr", "deformable_detr", "deformable_detr_two_stage")

# Hugging Face config arguments per preset and config class. "paper": the papers' sizes (the
# transformers defaults: d 256, 8 heads, 6 + 6 layers, FFN 2048 (Deformable: 1024), 300 queries
# (DETR: 100), 4 levels x 4 points) on a timm ResNet-50 with 80 COCO classes. "tiny": the
# configs/tests/*_tiny_parity.yaml models (timm ResNet-18, d 64, 4 heads, 10 queries, 5 classes).
_PAPER = dict(backbone="resnet50", use_pretrained_backbone=False, num_labels=80, dropout=0.0)
_TINY_COMMON = dict(
    backbone="resnet18",
    use_pretrained_backbone=False,
    num_labels=5,
    encoder_layers=2,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_queries=10,
    dropout=0.0,
)
# RT-DETR(v2): "paper" = the transformers defaults (ResNet-50-vd, = configs/rt_detr/*_r50vd_*),
# "tiny" = configs/tests/rt_detr_tiny_parity.yaml (its twin in tests/test_rt_detr_parity.py).
_RT_DETR_TINY = dict(
    encoder_in_channels=[128, 256, 512],
    d_model=64,
    encoder_hidden_dim=64,
    decoder_in_channels=[64, 64, 64],
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    decoder_layers=2,
    num_queries=10,
    num_labels=5,
    decoder_n_points=2,
    num_denoising=6,
)
_RT_DETR_PAPER = dict(num_labels=80)
HF_PRESETS = {
    "paper": {
        "DetrConfig": _PAPER,
        "DabDetrConfig": _PAPER,
        "DeformableDetrConfig": _PAPER,
        "RTDetrConfig": _RT_DETR_PAPER,
        "RTDetrV2Config": _RT_DETR_PAPER,
        "DFineConfig": _RT_DETR_PAPER,
    },
    "tiny": {
        "DetrConfig": dict(_TINY_COMMON, d_model=64, decoder_layers=3),
        "DabDetrConfig": dict(_TINY_COMMON, hidden_size=64, decoder_layers=2),
        "DeformableDetrConfig": dict(
            _TINY_COMMON,
            d_model=64,
            decoder_layers=2,
            two_stage_num_proposals=10,
            encoder_n_points=2,
            decoder_n_points=2,
        ),
        "RTDetrConfig": _RT_DETR_TINY,
        "RTDetrV2Config": _RT_DETR_TINY,
        "DFineConfig": dict(
            _RT_DETR_TINY, encoder_in_channels=[256, 512, 1024], depth_mult=0.34
        ),
    },
}


def _hf_backbone_kwargs(transformers, config_name: str, preset: str) -> Dict:
    """The tiny twins' backbones: RT-DETR's ResNet-18-vd, D-FINE's HGNetv2-B0 (the paper preset
    keeps the defaults, ResNet-50-vd and HGNetv2-B4)."""
    if preset != "tiny":
        return {}
    if config_name == "DFineConfig":
        b0 = transformers.HGNetV2Config(
            stem_channels=[3, 16, 16],
            stage_in_channels=[16, 64, 256, 512],
            stage_mid_channels=[16, 32, 64, 128],
            stage_out_channels=[64, 256, 512, 1024],
            hidden_sizes=[64, 256, 512, 1024],
            stage_num_blocks=[1, 1, 2, 1],
            stage_numb_of_layers=[3, 3, 3, 3],
            use_learnable_affine_block=True,
            out_features=["stage2", "stage3", "stage4"],
        )
        return {"backbone_config": b0}
    if not config_name.startswith("RTDetr"):
        return {}
    backbone = transformers.RTDetrResNetConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        layer_type="basic",
        embedding_size=64,
        out_indices=[2, 3, 4],
    )
    return {"backbone_config": backbone}


def _require(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise SystemExit(
            f"benchmarks/latency_vs_hf.py needs the optional package {name!r} ({e}); install it "
            "with `pip install transformers timm safetensors` (or run tools/bootstrap.sh)"
        )


def perturb_(model: torch.nn.Module, seed: int = 0, backbone: bool = True) -> None:
    """Small random changes to every float parameter and buffer (BatchNorm variances stay
    positive), so that no bias or norm keeps a constant initial value the comparison could hide
    behind; ``backbone`` False leaves ``model.backbone.*`` as initialised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not backbone and name.startswith("model.backbone."):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif tensor.is_floating_point() and not name.endswith(
                ("points_scale", "decoder.reg_scale", "decoder.up")
            ):
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=gen))


def build_hf_model(name: str, preset: str = "paper", seed: int = 0) -> torch.nn.Module:
    """The Hugging Face model of ``MODELS[name]`` with random (perturbed) weights, in eval mode."""
    transformers = _require("transformers")
    _require("timm")
    spec = MODELS[name]
    kwargs = dict(HF_PRESETS[preset][spec.hf_config], **dict(spec.hf_kwargs))
    kwargs.update(_hf_backbone_kwargs(transformers, spec.hf_config, preset))
    config = getattr(transformers, spec.hf_config)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.hf_class)(config).eval()
    perturb_(model, seed, backbone=spec.perturb_backbone)
    return model


def kd_detr_cfg(name: str, preset: str = "paper"):
    """The frozen kd_detr config of ``MODELS[name]`` (CPU, no pretrained weights)."""
    from kd_detr.config import load_config

    spec = MODELS[name]
    opts = list(spec.opts) + (list(spec.paper_opts) if preset == "paper" else [])
    return load_config(
        os.path.join(ROOT, spec.config_file if preset == "paper" else spec.tiny_config_file),
        opts + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"],
    )


def convert_into_ours(hf: torch.nn.Module, cfg) -> torch.nn.Module:
    """Save ``hf`` with ``save_pretrained``, convert the folder with the ``--source hf``
    converter (config check included) and load the result strictly into the model of ``cfg``."""
    from detectron2.modeling import build_model

    import kd_detr.modeling.meta_arch  # noqa: F401  (registers the meta-architectures)
    from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, check_state_dict_keys

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        state_dict = CHECKPOINT_CONVERTERS["hf"](folder, cfg)
    model = build_model(cfg).eval()
    check_state_dict_keys(state_dict, model.state_dict())
    model.load_state_dict(state_dict, strict=True)
    return model


def build_pair(name: str, preset: str = "paper", seed: int = 0):
    """(ours, hf): the two models of ``MODELS[name]`` with the same weights, in eval mode."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose from {sorted(MODELS)}")
    hf = build_hf_model(name, preset, seed)
    return convert_into_ours(hf, kd_detr_cfg(name, preset)), hf


def make_input(size: int, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """A normalised image (1, 3, size, size) and its all-False padding mask (1, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(1, 3, size, size, generator=gen)
    return images, torch.zeros(1, size, size, dtype=torch.bool)


def runners(ours, hf, images, mask) -> Dict[str, Callable[[], Tuple[torch.Tensor, torch.Tensor]]]:
    """Zero-argument callables returning (logits (B, Q, K), boxes (B, Q, 4)) of each model."""
    pixel_mask = (~mask).long()

    def run_ours():
        out = ours.forward_raw((images, mask))
        return out["pred_logits"], out["pred_boxes"]

    def run_hf():
        out = hf(pixel_values=images, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes

    return {"ours": run_ours, "hf": run_hf}


def interleaved_times(fns: Dict[str, Callable], reps: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of every function over ``reps`` rounds after ``warmup`` untimed rounds;
    each round calls every function once, in an order rotated by one per round."""
    names = list(fns)
    times = {n: [] for n in names}
    for rnd in range(warmup + reps):
        shift = rnd % len(names)
        for n in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[n]()
            if rnd >= warmup:
                times[n].append(time.perf_counter() - start)
    return times


def compare(
    name: str,
    ours,
    hf,
    size: int = 512,
    reps: int = 10,
    warmup: int = 2,
    out=sys.stdout,
) -> Dict[str, float]:
    """Check that both models agree on one input and time them side by side.

    Prints ``model=<name> ours_ms=... hf_ms=... ratio=... max_abs_diff=...`` to ``out``.

    Returns:
        dict: "ours_ms", "hf_ms" (medians), "ratio" (ours / hf), "max_abs_diff" (logits and
        boxes), "ours_min_ms", "hf_min_ms".
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    images, mask = make_input(size)
    fns = runners(ours.eval(), hf.eval(), images, mask)
    with torch.inference_mode():
        (a_logits, a_boxes), (b_logits, b_boxes) = fns["ours"](), fns["hf"]()
        if a_logits.shape != b_logits.shape or a_boxes.shape != b_boxes.shape:
            raise RuntimeError(
                f"{name}: output shapes differ, ours {tuple(a_logits.shape)} / "
                f"{tuple(a_boxes.shape)} vs Hugging Face {tuple(b_logits.shape)} / "
                f"{tuple(b_boxes.shape)}; the configs do not describe the same model"
            )
        diff = max((a_logits - b_logits).abs().max().item(), (a_boxes - b_boxes).abs().max().item())
        times = interleaved_times(fns, reps, warmup)
    result = {
        "ours_ms": 1000 * statistics.median(times["ours"]),
        "hf_ms": 1000 * statistics.median(times["hf"]),
        "ours_min_ms": 1000 * min(times["ours"]),
        "hf_min_ms": 1000 * min(times["hf"]),
        "max_abs_diff": diff,
    }
    result["ratio"] = result["ours_ms"] / result["hf_ms"]
    print(
        f"model={name} ours_ms={result['ours_ms']:.1f} hf_ms={result['hf_ms']:.1f} "
        f"ratio={result['ratio']:.3f} max_abs_diff={diff:.2e} "
        f"ours_min_ms={result['ours_min_ms']:.1f} hf_min_ms={result['hf_min_ms']:.1f} "
        f"size={size} reps={reps} threads={torch.get_num_threads()}",
        file=out,
        flush=True,
    )
    return result


def profile(name: str, ours, hf, size: int = 512, row_limit: int = 15, out=sys.stdout) -> None:
    """One forward pass of each model under ``torch.profiler``; prints the operators with the
    largest self CPU time, ours then Hugging Face's."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    images, mask = make_input(size)
    for label, fn in runners(ours, hf, images, mask).items():
        with torch.inference_mode():
            fn()  # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
        print(f"--- profile model={name} impl={label}\n{table}", file=out, flush=True)


@contextlib.contextmanager
def quiet_hf():
    """Hide transformers' progress bars and load-report warnings while building models."""
    transformers = _require("transformers")
    transformers.logging.disable_progress_bar()
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--preset", default="paper", choices=sorted(HF_PRESETS))
    parser.add_argument("--size", type=int, default=512, help="square input side (800: papers)")
    parser.add_argument("--reps", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[List[str]] = None) -> List[Dict[str, float]]:
    args = build_parser().parse_args(argv)
    if args.size < 32 or args.size % 32:
        raise SystemExit(f"--size must be a positive multiple of 32, got {args.size}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    logging.getLogger("timm").setLevel(logging.ERROR)
    results = []
    for name in args.models:
        with quiet_hf():
            ours, hf = build_pair(name, args.preset, args.seed)
        results.append(compare(name, ours, hf, args.size, args.reps, args.warmup))
        if args.profile:
            profile(name, ours, hf, args.size)
        del ours, hf
    return results


if __name__ == "__main__":
    main()
