# Copyright (c) kd_detr contributors.
"""Noise applied to ground truth to build denoising queries (DN-DETR, Li et al. 2022; DINO's
contrastive denoising, Zhang et al. 2022). Boxes are normalised cxcywh in [0, 1]."""
from typing import Optional

import torch

from ..box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["noise_labels", "noise_boxes", "noise_boxes_contrastive"]

# Smallest width / height a noised box keeps: the DAB decoder divides by them.
MIN_BOX_SIZE = 1e-4


def _rand(like: torch.Tensor, generator: Optional[torch.Generator]):
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def noise_labels(
    labels: torch.Tensor,
    ratio: float,
    num_classes: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Resample each label with probability ``ratio`` uniformly from the C classes.

    As in DN-DETR, a resampled label may equal the original one, so the fraction of labels that
    actually change is ``ratio * (C - 1) / C``.

    Args:
        labels (Tensor): (M,) int64 class indices in [0, C).
        ratio (float): resampling probability in [0, 1].
        num_classes (int): C.
        generator (torch.Generator): optional source of randomness (tests).

    Returns:
        Tensor: (M,) int64 noised labels (a new tensor).
    """
    if ratio <= 0 or labels.numel() == 0:
        return labels.clone()
    chosen = _rand(labels.float(), generator) < ratio
    new = torch.randint(
        0, num_classes, labels.shape, generator=generator, device=labels.device
    )
    return torch.where(chosen, new, labels)


def noise_boxes(
    boxes: torch.Tensor, scale: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """DN-DETR box noise: shift the centre by up to ``scale * (w / 2, h / 2)`` and scale the width
    and height by a factor in ``[1 - scale, 1 + scale]`` (each uniform), then clamp to [0, 1].

    Args:
        boxes (Tensor): (M, 4) cxcywh in [0, 1].
        scale (float): lambda, the box noise scale.
        generator (torch.Generator): optional source of randomness (tests).

    Returns:
        Tensor: (M, 4) noised cxcywh boxes, width and height at least :data:`MIN_BOX_SIZE`.
    """
    if scale <= 0 or boxes.numel() == 0:
        return boxes.clone()
    wh = boxes[:, 2:]
    spread = torch.cat([wh / 2, wh], dim=1)  # max |change| of (cx, cy, w, h) for scale 1
    noised = boxes + (_rand(boxes, generator) * 2 - 1) * spread * scale
    noised = noised.clamp(0.0, 1.0)
    return torch.cat([noised[:, :2], noised[:, 2:].clamp(min=MIN_BOX_SIZE)], dim=1)


def noise_boxes_contrastive(
    boxes: torch.Tensor,
    scale: float,
    negative: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DINO's contrastive box noise: every corner moves by ``r * scale * (w / 2 or h / 2)`` with a
    random sign, ``r`` uniform in [0, 1) for positive queries and in [1, 2) for negative ones, so
    negatives lie farther from the ground truth; corners are clamped to [0, 1].

    Args:
        boxes (Tensor): (M, 4) cxcywh in [0, 1].
        scale (float): lambda, the box noise scale (DINO: 1.0).
        negative (Tensor): (M,) bool, True for negative queries.
        generator (torch.Generator): optional source of randomness (tests).

    Returns:
        Tensor: (M, 4) noised cxcywh boxes, width and height at least :data:`MIN_BOX_SIZE`.
    """
    if boxes.numel() == 0:
        return boxes.clone()
    half = boxes[:, 2:].repeat(1, 2) / 2  # (w/2, h/2, w/2, h/2) per corner coordinate
    magnitude = _rand(boxes, generator) + negative[:, None].to(boxes.dtype)
    sign = (_rand(boxes, generator) < 0.5).to(boxes.dtype) * 2 - 1
    corners = box_cxcywh_to_xyxy(boxes) + sign * magnitude * half * scale
    noised = box_xyxy_to_cxcywh(corners.clamp(0.0, 1.0))
    return torch.cat([noised[:, :2], noised[:, 2:].clamp(min=MIN_BOX_SIZE)], dim=1)
