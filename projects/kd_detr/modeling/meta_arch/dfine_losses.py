# Copyright (c) kd_detr contributors.
"""D-FINE's box-distribution losses.

* Fine-grained localization (FGL): each edge distance of a matched query's target box, measured
  from the query's coarse layer-0 box in units of the weighting function, falls between two bins
  n and n + 1; the predicted distribution is trained towards both with a cross-entropy weighted
  by the distances to them (unimodal distribution focal loss), weighted by the IoU of the
  predicted box and divided by ``num_boxes``.
* Decoupled distillation focal (DDF), the loss of GO-LSD self-distillation: every layer's edge
  distributions (at temperature T) are pulled towards the final layer's (KL divergence x T^2),
  weighted by the teacher's class confidence (matched queries: the IoU with their object);
  matched and unmatched queries are averaged separately and mixed with weights
  sqrt(count / batch size). Any teacher with the same bins works, so the term also distills
  from another model.
* GO-LSD's union matching (:func:`union_indices`): the box losses (L1, GIoU, FGL, DDF) of every
  layer use the union of all layers' (and the encoder's) Hungarian matches, so a query matched in
  any layer is localized in all of them; the class loss keeps each layer's own matching.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..transformer.dfine_decoder import weighting_function

__all__ = [
    "union_indices",
    "bbox2distance",
    "ddf_loss",
    "fgl_loss",
    "translate_gt",
    "unimodal_distribution_focal_loss",
]


def translate_gt(gt: torch.Tensor, num_bins: int, reg_scale, up) -> Tuple[torch.Tensor, ...]:
    """Left bin index and the (right, left) interpolation weights of continuous distances.

    Args:
        gt (Tensor): (M,) distances in weighting-function units.

    Returns:
        tuple: float index n (M,) of the bin left of each value (0 below the range with all
        weight left; ``num_bins - 0.1`` above it with all weight right), weight of bin n + 1
        and weight of bin n (M,).
    """
    gt = gt.reshape(-1)
    values = weighting_function(num_bins, up, reg_scale).to(gt)
    index = ((values[None] - gt[:, None]) <= 0).sum(1).to(gt.dtype) - 1
    w_right, w_left = torch.zeros_like(index), torch.zeros_like(index)
    valid = (index >= 0) & (index < num_bins)
    left = values[index[valid].long()]
    right = values[index[valid].long() + 1]
    d_left, d_right = (gt[valid] - left).abs(), (right - gt[valid]).abs()
    w_right[valid] = d_left / (d_left + d_right)
    w_left[valid] = 1.0 - w_right[valid]
    below, above = index < 0, index >= num_bins
    w_right[below], w_left[below], index[below] = 0.0, 1.0, 0.0
    w_right[above], w_left[above], index[above] = 1.0, 0.0, num_bins - 0.1
    return index, w_right, w_left


def bbox2distance(points, boxes_xyxy, num_bins: int, reg_scale, up, eps: float = 0.1):
    """FGL targets: the (left, top, right, bottom) distances of ``boxes_xyxy`` (N, 4) from the
    centres of ``points`` (N, 4) cxcywh, in units of ``size / reg_scale`` minus half of
    reg_scale (the inverse of :func:`~kd_detr.modeling.transformer.dfine_decoder.distance2bbox`),
    as bins: returns (index (4N,) clamped to [0, num_bins - eps], weight right, weight left)."""
    reg_scale = reg_scale.abs()
    half = 0.5 * reg_scale
    w, h = points[:, 2] / reg_scale + 1e-16, points[:, 3] / reg_scale + 1e-16
    left = (points[:, 0] - boxes_xyxy[:, 0]) / w - half
    top = (points[:, 1] - boxes_xyxy[:, 1]) / h - half
    right = (boxes_xyxy[:, 2] - points[:, 0]) / w - half
    bottom = (boxes_xyxy[:, 3] - points[:, 1]) / h - half
    index, w_right, w_left = translate_gt(
        torch.stack([left, top, right, bottom], -1), num_bins, reg_scale, up
    )
    return index.clamp(min=0, max=num_bins - eps).detach(), w_right.detach(), w_left.detach()


def unimodal_distribution_focal_loss(logits, index, w_right, w_left, weight=None):
    """(M,) ``CE(logits, floor(index)) * w_left + CE(logits, floor(index) + 1) * w_right``
    (times ``weight``) for (M, num_bins + 1) logits."""
    left = index.long()
    loss = F.cross_entropy(logits, left, reduction="none") * w_left
    loss = loss + F.cross_entropy(logits, left + 1, reduction="none") * w_right
    return loss if weight is None else loss * weight


def fgl_loss(corners, initial_boxes, target_boxes_xyxy, iou, num_bins, reg_scale, up, num_boxes):
    """Fine-grained localization loss of N matched queries.

    Args:
        corners (Tensor): (N, 4 (num_bins + 1)) their distribution logits.
        initial_boxes (Tensor): (N, 4) their coarse layer-0 boxes (cxcywh).
        target_boxes_xyxy (Tensor): (N, 4) their objects.
        iou (Tensor): (N,) IoU of their predicted boxes with their objects (the weight).
        num_bins, reg_scale, up: the weighting function.
        num_boxes (float): the normaliser.

    Returns:
        Tensor: scalar.
    """
    with torch.no_grad():
        index, w_right, w_left = bbox2distance(
            initial_boxes.detach(), target_boxes_xyxy, num_bins, reg_scale, up
        )
    weight = iou.detach()[:, None].repeat(1, 4).reshape(-1)
    logits = corners.reshape(-1, num_bins + 1)
    loss = unimodal_distribution_focal_loss(logits, index, w_right, w_left, weight)
    return loss.sum() / num_boxes


def ddf_loss(corners, teacher_corners, teacher_logits, matched, matched_iou, num_bins, T=5.0):
    """Decoupled distillation focal loss (GO-LSD).

    Args:
        corners (Tensor): (B, Q, 4 (num_bins + 1)) the student layer's distribution logits.
        teacher_corners (Tensor): (B, Q, 4 (num_bins + 1)) the teacher's (detached here).
        teacher_logits (Tensor): (B, Q, C) the teacher's class logits.
        matched (Tensor): (B, Q) bool, queries matched to an object.
        matched_iou (Tensor): (number of matched,) their IoU, in ``matched.nonzero()`` order.
        T (float): temperature.

    Returns:
        Tensor: scalar.
    """
    bsz = corners.shape[0]
    weight = teacher_logits.detach().sigmoid().max(-1).values  # (B, Q)
    weight = weight.masked_scatter(matched, matched_iou.detach().to(weight.dtype))
    weight = weight[..., None].expand(-1, -1, 4).reshape(-1)
    student = F.log_softmax(corners.reshape(-1, num_bins + 1) / T, dim=1)
    teacher = F.softmax(teacher_corners.detach().reshape(-1, num_bins + 1) / T, dim=1)
    kl = F.kl_div(student, teacher, reduction="none").sum(-1) * (T**2) * weight  # (B*Q*4,)
    pos = matched[..., None].expand(-1, -1, 4).reshape(-1)
    num_pos, num_neg = (pos.sum() / bsz) ** 0.5, ((~pos).sum() / bsz) ** 0.5
    loss_pos = kl[pos].mean() if pos.any() else kl.sum() * 0
    loss_neg = kl[~pos].mean() if (~pos).any() else kl.sum() * 0
    return (loss_pos * num_pos + loss_neg * num_neg) / (num_pos + num_neg)


def union_indices(indices_per_layer: List[List[Tuple[torch.Tensor, torch.Tensor]]]):
    """Union of several matchings of the same images (GO-LSD).

    Args:
        indices_per_layer: per layer, per image (query indices, target indices).

    Returns:
        list[tuple[Tensor, Tensor]]: per image, every query matched in some layer, paired with
        the target it was matched to most often (ties: the pair ``torch.unique`` lists first,
        i.e. the smaller (query, target)); queries in ascending order.
    """
    out = []
    for per_image in zip(*indices_per_layer):
        pairs = torch.cat([torch.stack([q, t], 1) for q, t in per_image]).long()
        if len(pairs) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            out.append((empty, empty.clone()))
            continue
        unique, counts = torch.unique(pairs, return_counts=True, dim=0)
        order = torch.argsort(counts, descending=True, stable=True)
        chosen = {}
        for q, t in unique[order].tolist():
            chosen.setdefault(q, t)
        queries = sorted(chosen)
        out.append((torch.tensor(queries), torch.tensor([chosen[q] for q in queries])))
    return out
