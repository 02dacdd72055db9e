#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Inference latency of exported models against eager PyTorch: TorchScript, ONNX Runtime and
(when installed) OpenVINO, batch 1, CPU.

For every model, the model of the config is built with random (perturbed) weights, wrapped in its
export adapter (``kd_detr.export``: normalisation, padding, model, top-k post-processing) and
exported to ONNX and TorchScript at a square ``--size`` (default: the config's
INPUT.MIN_SIZE_TEST). All runtimes then run the same input (one real-valued image, original size
= input size) in one interleaved loop (``--warmup`` untimed rounds, then ``--reps`` rounds; each
round times every runtime once, rotating which goes first, so all see the same machine load).
What is timed is one call of the whole graph, images -> (labels, boxes, scores): eager =
``adapter(images, sizes)`` under ``torch.inference_mode``. Printed per model and runtime:

    model=<name> runtime=<name> ms=<median> eager_ms=<median> ratio=<runtime/eager>
        max_score_diff=<max |score - eager score|> size=<side> threads=<n>

Usage:
    python benchmarks/export_latency.py [--models demo_dab_detr demo_deformable_detr demo_dino]
        [--size S] [--reps 20] [--warmup 3] [--threads N] [--runtimes ...]
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config file relative to the repository, extra config overrides)
MODELS = {
    "demo_dab_detr": ("configs/demo/dab_detr_efflite0_demo.yaml", ()),
    "demo_deformable_detr": ("configs/demo/deformable_detr_efflite0_demo.yaml", ()),
    "demo_dino": ("configs/demo/dino_efflite0_demo.yaml", ()),
    "tiny_detr": ("configs/tests/detr_tiny_parity.yaml", ()),
    "tiny_deformable_detr": ("configs/tests/deformable_detr_tiny_parity.yaml", ()),
}
DEFAULT_MODELS = ("demo_dab_detr", "demo_deformable_detr", "demo_dino")
RUNTIMES = ("torchscript", "onnxruntime", "openvino")


def build(name: str, seed: int = 0):
    """(cfg, eval model) of ``MODELS[name]``: random weights, every float parameter perturbed
    (no zero-initialised head hides work), no pretrained backbone download."""
    from detectron2.modeling import build_model

    from kd_detr.export import load_export_config

    config_file, opts = MODELS[name]
    opts = list(opts) + ["MODEL.WEIGHTS", ""]
    if "efflite" in config_file:
        opts += ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]
    cfg = load_export_config(os.path.join(ROOT, config_file), opts=opts)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return cfg, model


def runners(cfg, model, size: int, names, threads: int, folder: str) -> Dict[str, Callable]:
    """{runtime name: runner}: eager first, then the requested runtimes that are available."""
    from kd_detr.export import (
        EagerRunner,
        ExportError,
        build_export_adapter,
        build_runner,
        export_model,
    )

    adapter = build_export_adapter(cfg, model)
    out = {"eager": EagerRunner(adapter)}
    files = {}
    for runtime in names:
        fmt = "torchscript" if runtime == "torchscript" else "onnx"
        if fmt not in files:
            files[fmt] = export_model(cfg, model, fmt, os.path.join(folder, fmt), (size, size))
        try:
            out[runtime] = build_runner(files[fmt], runtime=runtime, num_threads=threads)
        except ExportError as e:
            print(f"# skipped {runtime}: {e}", file=sys.stderr)
    return out


def interleaved(fns: Dict[str, Callable], warmup: int, reps: int) -> Dict[str, List[float]]:
    """Milliseconds per call of every function, timed in interleaved rounds."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(warmup + reps):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[n]()
            if r >= warmup:
                times[n].append((time.perf_counter() - start) * 1000.0)
    return times


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODELS))
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--size", type=int, default=0, help="square input side (0: MIN_SIZE_TEST)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="threads of every runtime (0: torch's)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    rows = []
    for name in args.models:
        cfg, model = build(name)
        size = args.size or int(cfg.INPUT.MIN_SIZE_TEST)
        gen = np.random.RandomState(0)
        images = gen.uniform(0, 255, (1, 3, size, size)).astype(np.float32)
        sizes = np.array([[size, size]], dtype=np.int64)
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fns = runners(cfg, model, size, args.runtimes, threads, folder)
            reference = fns["eager"](images, sizes)
            calls = {n: (lambda f=f: f(images, sizes)) for n, f in fns.items()}
            with torch.inference_mode():
                times = interleaved(calls, args.warmup, args.reps)
            eager_ms = statistics.median(times["eager"])
            for runtime in [n for n in fns if n != "eager"]:
                diff = float(np.abs(fns[runtime](images, sizes)[2] - reference[2]).max())
                ms = statistics.median(times[runtime])
                row = dict(model=name, runtime=runtime, ms=ms, eager_ms=eager_ms)
                row.update(ratio=ms / eager_ms, max_score_diff=diff, size=size, threads=threads)
                rows.append(row)
                print(
                    f"model={name} runtime={runtime} ms={ms:.2f} eager_ms={eager_ms:.2f} "
                    f"ratio={ms / eager_ms:.3f} max_score_diff={diff:.1e} size={size} "
                    f"threads={threads}",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
