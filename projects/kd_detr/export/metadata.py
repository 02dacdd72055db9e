# Copyright (c) kd_detr contributors.
"""The JSON sidecar written next to an exported model (``export.json``): what a runner or the demo
needs besides the graph (input size and format, class names, the graph's contract)."""
import json
import os
from typing import Dict, List, Sequence

__all__ = ["METADATA_FILE", "read_export_metadata", "write_export_metadata"]

METADATA_FILE = "export.json"


def write_export_metadata(
    output_dir: str,
    *,
    model_file: str,
    export_format: str,
    meta_architecture: str,
    image_size: Sequence[int],
    input_format: str,
    class_names: List[str],
    opset: int,
    dynamic_batch: bool,
    config_file: str = "",
    weights: str = "",
) -> str:
    """Write ``output_dir/export.json``; returns its path."""
    meta = {
        "model_file": os.path.basename(model_file),
        "format": export_format,
        "meta_architecture": meta_architecture,
        "image_size": [int(s) for s in image_size],
        "input_format": input_format,
        "class_names": list(class_names),
        "opset": opset if export_format == "onnx" else None,
        "dynamic_batch": bool(dynamic_batch),
        "config_file": config_file,
        "weights": weights,
        "inputs": {
            "images": "(N, 3, H, W) float32 pixels in input_format, resized to image_size, "
            "not normalised",
            "orig_target_sizes": "(N, 2) int64 (width, height) of the original images",
        },
        "outputs": {
            "labels": "(N, k) int64 class index into class_names",
            "boxes": "(N, k, 4) float32 xyxy in original pixels",
            "scores": "(N, k) float32, decreasing",
        },
    }
    path = os.path.join(output_dir, METADATA_FILE)
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)
    return path


def read_export_metadata(model_path: str) -> Dict:
    """The ``export.json`` next to an exported model file, or {} when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), METADATA_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
