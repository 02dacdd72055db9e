# Copyright (c) kd_detr contributors.
"""``--check``: the ONNX checker, and exported outputs against the eager meta-architecture on real
images (Detectron2's own ``forward`` + ``detector_postprocess``, not the export adapter)."""
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from detectron2.data.detection_utils import read_image
from detectron2.structures import Instances

from .errors import require_package
from .predictor import ExportedModel, resize_image

__all__ = ["check_onnx_file", "compare_instances", "compare_on_images", "load_batch"]


def check_onnx_file(path: str) -> None:
    """``onnx.checker.check_model`` on the file (raises onnx's ValidationError when invalid)."""
    onnx = require_package("onnx", extra="export")
    onnx.checker.check_model(path, full_check=True)


def load_batch(paths: Sequence[str], image_size: Sequence[int], input_format: str) -> List[Dict]:
    """Detectron2 dicts of image files resized to ``image_size`` (H, W), with the original
    "height" / "width", as a test loader with :func:`export_resize` gives them."""
    batch = []
    for path in paths:
        image = read_image(path, format=input_format)
        resized = resize_image(image, image_size)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        batch.append({"image": tensor, "height": image.shape[0], "width": image.shape[1]})
    return batch


def _canonical(inst: Instances, top: int, tie: float):
    """The first ``top`` detections, as (scores, labels, boxes) with detections whose scores tie
    (within ``tie``) sorted by (label, box) so that the order of equal scores does not matter."""
    scores = inst.scores[:top].double().numpy()
    labels = inst.pred_classes[:top].numpy()
    boxes = inst.pred_boxes.tensor[:top].double().numpy()
    order, start = [], 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or abs(scores[i] - scores[i - 1]) > tie:
            group = list(range(start, i))
            order += sorted(group, key=lambda j: (labels[j], *np.round(boxes[j], 2)))
            start = i
    return scores[order], labels[order], boxes[order]


def compare_instances(
    eager: List[Instances], exported: List[Instances], top: int = 10, tie: float = 1e-6
) -> Dict[str, float]:
    """Largest differences over the ``top`` highest-scoring detections of every image.

    Returns:
        dict: "score" max |score difference|, "box" max |box difference| / max(H, W) of the
        original image, "label_mismatches" count, "count_mismatches" images whose number of
        detections differs (among the first ``top``), "detections" compared.
    """
    out = {"score": 0.0, "box": 0.0, "label_mismatches": 0, "count_mismatches": 0}
    out["detections"] = 0
    for a, b in zip(eager, exported):
        sa, la, ba = _canonical(a, top, tie)
        sb, lb, bb = _canonical(b, top, tie)
        n = min(len(sa), len(sb))
        out["count_mismatches"] += int(len(sa) != len(sb))
        out["detections"] += n
        if n == 0:
            continue
        out["score"] = max(out["score"], float(np.abs(sa[:n] - sb[:n]).max()))
        scale = float(max(a.image_size))
        out["box"] = max(out["box"], float(np.abs(ba[:n] - bb[:n]).max()) / scale)
        out["label_mismatches"] += int((la[:n] != lb[:n]).sum())
    return out


def compare_on_images(
    model: nn.Module,
    runner,
    image_paths: Sequence[str],
    image_size: Sequence[int],
    input_format: str,
    top: int = 10,
) -> Dict[str, float]:
    """Run the eager model (eval mode) and an exported runner on the same resized images in one
    batch and :func:`compare_instances` their detections."""
    batch = load_batch(image_paths, image_size, input_format)
    with torch.no_grad():
        eager = [r["instances"].to("cpu") for r in model(batch)]
    exported = [r["instances"] for r in ExportedModel(runner)(batch)]
    return compare_instances(eager, exported, top=top)
