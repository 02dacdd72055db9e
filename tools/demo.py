#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Detectron2's demo for kd_detr models: images (files or globs) or a video -> the frames with the
detections drawn by Detectron2's Visualizer, named with the dataset's class names.

    # eager PyTorch, any config (weights as a config override, as in Detectron2's demo):
    python tools/demo.py --config-file configs/demo/dab_detr_efflite0_demo.yaml \\
        --input "datasets/demo/*.jpg" --output output/demo/ --confidence-threshold 0.5 \\
        --opts MODEL.WEIGHTS output/demo_dab_detr/model_final.pth
    # an exported model (tools/export_model.py; its export.json gives size, format, classes):
    python tools/demo.py --onnx export/model.onnx --input img.jpg --output output/demo/
    # a video:
    python tools/demo.py --config-file ... --video-input clip.mp4 --output output/demo/ --opts ...

Open-vocabulary demos with a vocabulary chosen at run time: tools/ov_demo.py.
"""
import argparse
import glob
import logging
import os
import sys
from typing import Dict, List

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from kd_detr.config import load_config
from kd_detr.export import (
    ExportedPredictor,
    ExportError,
    build_runner,
    read_export_metadata,
    require_package,
)

logger = logging.getLogger("kd_detr.demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="", help="the model's config (eager mode)")
    p.add_argument("--onnx", default="", help="an exported model.onnx (or model.ts) instead")
    p.add_argument("--input", nargs="+", default=[], help="image files or globs")
    p.add_argument("--video-input", default="", help="a video file")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="runtime threads (0: default)")
    p.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    args = p.parse_args(argv)
    if bool(args.config_file) == bool(args.onnx):
        p.error("give exactly one of --config-file (eager) and --onnx (exported model)")
    if bool(args.input) == bool(args.video_input):
        p.error("give exactly one of --input and --video-input")
    return args


def build_predictor(args):
    """(predictor: BGR image -> {"instances"}, metadata with thing_classes)."""
    if args.onnx:
        meta = read_export_metadata(args.onnx)
        if not meta:
            raise ExportError(
                f"no export.json next to {args.onnx}. Fix: export with tools/export_model.py, "
                "which writes it"
            )
        runner = build_runner(args.onnx, num_threads=args.threads)
        predictor = ExportedPredictor(runner, meta["image_size"], meta["input_format"])
        return predictor, Metadata(name="exported", thing_classes=meta["class_names"])
    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
    metadata = MetadataCatalog.get(names[0]) if names else Metadata(name="unknown")
    return DefaultPredictor(cfg), metadata


def draw(image_bgr: np.ndarray, predictions: Dict, metadata, threshold: float) -> np.ndarray:
    """The RGB image with the detections scoring at least ``threshold`` drawn."""
    instances = predictions["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata)
    return visualizer.draw_instance_predictions(instances).get_image()


def image_files(patterns: List[str]) -> List[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files += matched
    return files


def run_images(args, predictor, metadata) -> List[Dict]:
    from PIL import Image

    results = []
    for path in image_files(args.input):
        image = read_image(path, format="BGR")
        predictions = predictor(image)
        drawn = draw(image, predictions, metadata, args.confidence_threshold)
        out_path = os.path.join(args.output, os.path.basename(path))
        Image.fromarray(drawn).save(out_path)
        kept = int((predictions["instances"].scores >= args.confidence_threshold).sum())
        logger.info(f"{path}: {kept} detections -> {out_path}")
        results.append({"input": path, "output": out_path, "detections": kept})
    return results


def run_video(args, predictor, metadata) -> List[Dict]:
    cv2 = require_package("cv2", "opencv-python-headless")  # optional: only for --video-input
    video = cv2.VideoCapture(args.video_input)
    if not video.isOpened():
        raise FileNotFoundError(f"cannot open --video-input {args.video_input!r}")
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    name = os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4"
    out_path = os.path.join(args.output, name)
    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frames = 0
    while True:
        ok, frame = video.read()
        if not ok:
            break
        drawn = draw(frame, predictor(frame), metadata, args.confidence_threshold)
        writer.write(drawn[:, :, ::-1])
        frames += 1
    video.release()
    writer.release()
    logger.info(f"{args.video_input}: {frames} frames -> {out_path}")
    return [{"input": args.video_input, "output": out_path, "frames": frames}]


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    setup_logger(name="kd_detr")
    os.makedirs(args.output, exist_ok=True)
    predictor, metadata = build_predictor(args)
    if args.video_input:
        return run_video(args, predictor, metadata)
    return run_images(args, predictor, metadata)


if __name__ == "__main__":
    try:
        main()
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
