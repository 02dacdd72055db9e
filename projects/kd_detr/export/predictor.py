# Copyright (c) kd_detr contributors.
"""Detectron2-style inputs and outputs around an exported model.

:class:`ExportedModel` takes Detectron2 dataset dicts (as a test data loader yields them: "image"
(3, H, W) already resized to the export size, "height"/"width" of the original image) and returns
``[{"instances": Instances}]`` like a meta-architecture in eval mode, so Detectron2's
``inference_on_dataset`` and evaluators run on an exported model unchanged.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

__all__ = [
    "ExportedModel",
    "ExportedPredictor",
    "batch_arrays",
    "detections_to_instances",
    "export_resize",
    "resize_image",
]


def export_resize(image_size: Sequence[int]) -> T.Augmentation:
    """The test-time augmentation of an exported model: a plain resize to (H, W)."""
    height, width = image_size
    return T.Resize((int(height), int(width)))


def resize_image(image: np.ndarray, image_size: Sequence[int]) -> np.ndarray:
    """(h, w, 3) image -> (H, W, 3) with :func:`export_resize` (PIL bilinear, as Detectron2)."""
    aug_input = T.AugInput(image)
    export_resize(image_size)(aug_input)
    return aug_input.image


def batch_arrays(batched_inputs: List[Dict]) -> Tuple[np.ndarray, np.ndarray]:
    """Detectron2 dicts -> images (N, 3, H, W) float32 and orig_target_sizes (N, 2) int64
    (width, height; the "image" size when "height"/"width" are absent).

    Raises:
        ValueError: when the images differ in size (an exported graph has one image size).
    """
    images = [torch.as_tensor(x["image"]) for x in batched_inputs]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(
            f"an exported model takes images of one size, got {sorted(shapes)}: resize them "
            "with kd_detr.export.resize_image first"
        )
    sizes = [
        (x.get("width", im.shape[2]), x.get("height", im.shape[1]))
        for x, im in zip(batched_inputs, images)
    ]
    batch = torch.stack(images).to(torch.float32).numpy()
    return batch, np.asarray(sizes, dtype=np.int64)


def detections_to_instances(
    labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray, sizes: np.ndarray
) -> List[Instances]:
    """Per image, ``Instances`` of the original size with pred_boxes / scores / pred_classes,
    dropping empty boxes as ``detector_postprocess`` does (boxes are already clipped).

    Args:
        labels (N, k), boxes (N, k, 4), scores (N, k): exported outputs.
        sizes (N, 2): (width, height) of the original images.
    """
    results = []
    for i, (width, height) in enumerate(sizes.tolist()):
        result = Instances((int(height), int(width)))
        result.pred_boxes = Boxes(torch.from_numpy(boxes[i]))
        result.scores = torch.from_numpy(scores[i])
        result.pred_classes = torch.from_numpy(labels[i])
        results.append(result[result.pred_boxes.nonempty()])
    return results


class ExportedModel:
    """A runner (see :mod:`.runtime`) as a Detectron2 model in inference mode."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        images, sizes = batch_arrays(batched_inputs)
        labels, boxes, scores = self.runner(images, sizes)
        return [{"instances": r} for r in detections_to_instances(labels, boxes, scores, sizes)]


class ExportedPredictor:
    """Detectron2's ``DefaultPredictor`` for an exported model: one BGR image (h, w, 3) uint8
    (as ``read_image(path, "BGR")`` or OpenCV give it) -> {"instances": Instances} in its pixels.

    Args:
        runner: see :mod:`.runtime`.
        image_size: (H, W) of the exported graph.
        input_format: the model's ``INPUT.FORMAT`` ("BGR" or "RGB").
    """

    def __init__(self, runner, image_size: Sequence[int], input_format: str):
        self.model = ExportedModel(runner)
        self.image_size = tuple(image_size)
        self.input_format = input_format

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
        resized = resize_image(np.ascontiguousarray(image), self.image_size)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        height, width = original_image.shape[:2]
        return self.model([{"image": tensor, "height": height, "width": width}])[0]
