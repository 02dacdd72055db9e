# Copyright (c) kd_detr contributors.
"""Shared by the export tests: tiny models with non-trivial heads, real coco128 images, and an
export -> runtime -> compare-with-eager round trip."""
import glob
import os

import torch

from detectron2.modeling import build_model

from kd_detr.export import build_runner, compare_on_images, export_model, load_export_config

from .common import REPO_ROOT, require_module, shared_data

TEST_CONFIGS = os.path.join(REPO_ROOT, "configs", "tests")
# Not a multiple of 32: exercises the in-graph padding and padding mask.
IMAGE_SIZE = (150, 200)
TOLERANCE = 1e-4


def coco128_images(count=3):
    """The first ``count`` coco128 val2017 images (real photos of different sizes)."""
    paths = sorted(glob.glob(os.path.join(shared_data("coco128", "val2017"), "*.jpg")))
    return paths[:count]


def tiny_model(config_name, *opts, seed=0):
    """(cfg, eval model) of ``configs/tests/<config_name>`` with random but non-zero box heads,
    deformable attention weights and sampling offsets (zero-initialised otherwise)."""
    cfg = load_export_config(os.path.join(TEST_CONFIGS, config_name), opts=opts)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            perturb = "attention_weights" in name or "sampling_offsets.weight" in name
            if perturb or ("bbox_embed" in name and not p.any()):
                p.normal_(std=0.1)
    return cfg, model.eval()


def roundtrip(test, cfg, model, export_format, output_dir, batches=(1, 3), runtime=""):
    """Export ``model``, then assert that the exported model's top detections equal the eager
    model's on real images for every batch size; returns {batch size: differences}."""
    if export_format == "onnx":
        require_module("onnx")
        require_module("onnxruntime" if not runtime else runtime)
    path = export_model(cfg, model, export_format, output_dir, IMAGE_SIZE, dynamic_batch=True)
    runner = build_runner(path, runtime=runtime, num_threads=1)
    images = coco128_images(max(batches))
    diffs = {}
    for batch in batches:
        diff = compare_on_images(model, runner, images[:batch], IMAGE_SIZE, cfg.INPUT.FORMAT)
        test.assertEqual(diff["detections"], 10 * batch, diff)
        test.assertEqual(diff["label_mismatches"], 0, diff)
        test.assertEqual(diff["count_mismatches"], 0, diff)
        test.assertLessEqual(diff["score"], TOLERANCE, diff)
        test.assertLessEqual(diff["box"], TOLERANCE, diff)
        diffs[batch] = diff
    return diffs
