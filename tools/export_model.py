#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Export a DETR-family model (a distilled student) to ONNX or TorchScript.

    python tools/export_model.py --config-file configs/demo/dab_detr_efflite0_demo.yaml \\
        --weights output/demo_dab_detr/model_final.pth --format onnx --output export/ \\
        --dynamic-batch --check --run-eval

The graph takes ``images`` (N, 3, H, W) float pixels in INPUT.FORMAT resized to --image-size
(default: a square of INPUT.MIN_SIZE_TEST; normalisation and padding are inside the graph) and
``orig_target_sizes`` (N, 2) int64 (width, height), and returns ``labels`` (N, k), ``boxes``
(N, k, 4) xyxy in original pixels and ``scores`` (N, k): the model's top-k inference. The output
folder gets model.onnx / model.ts and export.json (sizes, input format, class names).

--check: onnx.checker, then the exported model (ONNX Runtime / TorchScript) against the eager
model on real images (--check-images, default the first images of DATASETS.TEST[0]) in batches
of 1 and 3 (dynamic batch; else 1); exits 1 when scores or boxes (relative to the image size)
differ by more than --tolerance or a label differs among the top detections.
--run-eval: Detectron2's evaluator on DATASETS.TEST for the exported and the eager model, both
fed the same resized images. Open-vocabulary DETR heads (MODEL.OV.DETR_HEAD) export with their
test vocabulary, or the one of --text-embeddings (a .npy with its JSON sidecar of names).
Config overrides go last: KEY VALUE ...
"""
import argparse
import glob
import json
import logging
import sys

import torch

from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger

from kd_detr.export import (
    DEFAULT_OPSET,
    ExportError,
    build_runner,
    check_onnx_file,
    compare_on_images,
    evaluate_exported,
    export_model,
    load_export_config,
    load_model,
)
from kd_detr.ov.detr_ov_head import set_detr_vocabulary
from kd_detr.ov.text_embeddings import load_text_embeddings
from kd_detr.ov.vocabulary import embedding_row_names

logger = logging.getLogger("kd_detr.export_model")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="the model's config")
    p.add_argument("--weights", default="", help="checkpoint (.pth); default MODEL.WEIGHTS")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 16)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: symbolic batch size N")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    p.add_argument("--text-embeddings", default="", help="OV head: vocabulary to export (.npy)")
    p.add_argument("--check", action="store_true", help="checker + exported vs eager outputs")
    p.add_argument("--check-images", nargs="*", default=None, help="images or globs for --check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--check: max difference")
    p.add_argument("--run-eval", action="store_true", help="exported vs eager AP on DATASETS.TEST")
    p.add_argument("--threads", type=int, default=0, help="runtime / torch threads (0: default)")
    p.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides")
    return p.parse_args(argv)


def check_images(cfg, patterns, count=3):
    """Image files for --check: the given files / globs, else DATASETS.TEST[0]'s first ones."""
    if patterns:
        paths = sorted(p for pattern in patterns for p in glob.glob(pattern))
    elif cfg.DATASETS.TEST:
        paths = [d["file_name"] for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:count]]
    else:
        paths = []
    if not paths:
        raise ExportError("--check found no images. Fix: pass --check-images FILE_OR_GLOB ...")
    return (paths * count)[:count] if len(paths) < count else paths[:count]


def run_check(args, cfg, model, path, image_size) -> bool:
    """Print the differences per batch size; True when they are within the tolerance."""
    if args.format == "onnx":
        check_onnx_file(path)
        print(f"onnx.checker: {path} is valid")
    runner = build_runner(path, num_threads=args.threads)
    paths = check_images(cfg, args.check_images)
    ok = True
    batches = (1, 3) if args.dynamic_batch or args.format == "torchscript" else (1,)
    for batch in batches:
        chosen = (paths * batch)[:batch]
        diff = compare_on_images(model, runner, chosen, image_size, cfg.INPUT.FORMAT)
        good = (
            diff["score"] <= args.tolerance
            and diff["box"] <= args.tolerance
            and diff["label_mismatches"] == 0
            and diff["count_mismatches"] == 0
        )
        ok = ok and good
        print(
            f"check {runner.name} vs eager, batch {batch}: max |score diff| {diff['score']:.2e}, "
            f"max |box diff|/image size {diff['box']:.2e}, label mismatches "
            f"{diff['label_mismatches']}, count mismatches {diff['count_mismatches']} over "
            f"{diff['detections']} top detections -> {'OK' if good else 'FAIL'}"
        )
    return ok


def run_eval(args, cfg, model, path, image_size) -> None:
    runner = build_runner(path, num_threads=args.threads)
    results = evaluate_exported(cfg, model, runner, image_size, output_dir=None)
    nan = float("nan")
    for name, per_model in results.items():
        eager, exported = per_model["eager"].get("bbox", {}), per_model["exported"].get("bbox", {})
        print(
            f"eval {name}: eager AP {eager.get('AP', nan):.3f}  exported ({runner.name}) AP "
            f"{exported.get('AP', nan):.3f}  (AP50 {eager.get('AP50', nan):.3f} / "
            f"{exported.get('AP50', nan):.3f}), images resized to {tuple(image_size)}"
        )
        print("eval-json " + json.dumps({name: per_model}, default=float))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="kd_detr")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_export_config(args.config_file, args.weights, args.opts)
        model = load_model(cfg)
        names = None
        if args.text_embeddings:
            embeddings = load_text_embeddings(args.text_embeddings)
            try:
                set_detr_vocabulary(model, embeddings, "test")
            except (TypeError, ValueError) as e:
                raise ExportError(f"--text-embeddings: {e}") from None
            names = embedding_row_names(args.text_embeddings, len(embeddings))
        image_size = tuple(args.image_size) if args.image_size else None
        path = export_model(
            cfg, model, args.format, args.output, image_size, args.opset, args.dynamic_batch, names
        )
        image_size = image_size or (cfg.INPUT.MIN_SIZE_TEST,) * 2
        print(f"exported {cfg.MODEL.META_ARCHITECTURE} to {path} (image size {image_size})")
        ok = run_check(args, cfg, model, path, image_size) if args.check else True
        if args.run_eval:
            run_eval(args, cfg, model, path, image_size)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
