# Copyright (c) kd_detr contributors.
"""Box format conversions and (generalized) IoU for DETR-style set prediction.

Boxes are ``(..., 4)`` tensors, either ``(cx, cy, w, h)`` ("cxcywh") or ``(x0, y0, x1, y1)``
("xyxy"). Every function accepts empty inputs (``N == 0`` or ``M == 0``) and then returns empty
results of the documented shape.
"""
import torch

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "paired_generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes):
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes):
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes):
    """(..., 4) xyxy -> (...,) areas; degenerate boxes (x1 < x0) have area <= 0."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
    """Pairwise IoU.

    Args:
        boxes1 (Tensor): (N, 4) xyxy.
        boxes2 (Tensor): (M, 4) xyxy.

    Returns:
        tuple[Tensor, Tensor]: IoU (N, M) and union area (N, M).
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (Rezatofighi et al., 2019), in [-1, 1].

    Args:
        boxes1 (Tensor): (N, 4) xyxy with x1 >= x0 and y1 >= y0.
        boxes2 (Tensor): (M, 4) xyxy with x1 >= x0 and y1 >= y0.

    Returns:
        Tensor: (N, M) GIoU.
    """
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def paired_box_iou(boxes1, boxes2):
    """IoU of matching boxes, i.e. the diagonal of :func:`box_iou` without the (N, M) matrix.

    Args:
        boxes1 (Tensor): (..., 4) xyxy.
        boxes2 (Tensor): (..., 4) xyxy, same shape.

    Returns:
        Tensor: (...,) IoU of ``boxes1[i]`` with ``boxes2[i]`` (0 where both are empty).
    """
    wh = torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])
    wh = wh.clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union.clamp(min=1e-12)


def paired_generalized_box_iou(boxes1, boxes2):
    """GIoU of matching rows, i.e. the diagonal of :func:`generalized_box_iou` in O(N).

    Args:
        boxes1 (Tensor): (N, 4) xyxy.
        boxes2 (Tensor): (N, 4) xyxy.

    Returns:
        Tensor: (N,) GIoU of ``boxes1[i]`` with ``boxes2[i]``.
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    wh = torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])
    wh = wh.clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    wh_enc = torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])
    wh_enc = wh_enc.clamp(min=0)
    enclosing = wh_enc[:, 0] * wh_enc[:, 1]
    return inter / union - (enclosing - union) / enclosing
