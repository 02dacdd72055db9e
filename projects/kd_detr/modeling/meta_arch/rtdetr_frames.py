# Copyright (c) kd_detr contributors.
"""Box frames of mask-free detectors (RT-DETR, D-FINE).

Such a model sees the whole padded batch tensor (the "canvas") and predicts boxes relative to it,
while kd_detr's targets, extra query groups and inference use boxes relative to each image's
unpadded size (as the other DETRs, whose padding masks make them image-relative). With padding
at the right and bottom (Detectron2's ImageList) the two differ by a per-image scale
``s = (w / W, h / H)``: ``canvas = image * s``. Without padding (Hugging Face's fixed-size
input) ``s = 1`` and nothing changes.
"""
from typing import Dict

import torch

from detectron2.structures import ImageList

from .detr import ImagesLike, padding_mask

__all__ = ["BOX_KEYS", "canvas_scale", "to_canvas", "to_image"]

# Output entries holding cxcywh boxes (..., B, N, 4).
BOX_KEYS = ("pred_boxes", "reference_boxes", "initial_boxes", "pre_boxes")


def canvas_scale(images: ImagesLike) -> torch.Tensor:
    """(B, 1, 4) ``(w / W, h / H, w / W, h / H)`` of every image's unpadded part."""
    mask = padding_mask(images) if isinstance(images, ImageList) else images[1]
    _, height, width = mask.shape
    valid_w = (~mask[:, 0, :]).sum(-1).float() / width
    valid_h = (~mask[:, :, 0]).sum(-1).float() / height
    return torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None]


def to_canvas(boxes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Image-relative (B or 1, N, 4) boxes -> canvas-relative (B, N, 4)."""
    return boxes * scale.to(boxes.dtype)


def to_image(outputs: Dict, scale: torch.Tensor) -> Dict:
    """``outputs`` with every :data:`BOX_KEYS` entry (..., B, N, 4) made image-relative."""
    out = dict(outputs)
    for key in BOX_KEYS:
        if key in out:
            out[key] = out[key] / scale.to(out[key].dtype)
    return out
