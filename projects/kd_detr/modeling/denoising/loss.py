# Copyright (c) kd_detr contributors.
"""Denoising losses: every denoising query has a known target, so no matching is needed."""
import re
from typing import Dict

import torch
import torch.nn.functional as F

from ..box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from ..criterion import sigmoid_focal_loss
from .queries import DenoisingQueries

__all__ = ["denoising_loss_key", "denoising_losses"]

_KEY = re.compile(r"^(loss_[a-z]+)(?:_(\d+))?$")


def denoising_loss_key(key: str) -> str:
    """Denoising name of a detection loss key: ``loss_giou`` -> ``loss_giou_dn``, ``loss_giou_3``
    -> ``loss_giou_dn_3``."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"not a detection loss key: {key!r}")
    base, layer = match.groups()
    return f"{base}_dn" if layer is None else f"{base}_dn_{layer}"


def _layer_losses(logits, boxes, queries: DenoisingQueries, normalizer, alpha, gamma):
    valid, positive = queries.valid, queries.positive
    onehot = torch.zeros_like(logits)
    batch, slot = positive.nonzero(as_tuple=True)
    onehot[batch, slot, queries.target_labels[batch, slot]] = 1
    focal = sigmoid_focal_loss(logits, onehot, alpha, gamma)  # (B, N, C)
    pred, tgt = boxes[positive], queries.target_boxes[positive].to(boxes)
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
    return {
        "loss_class": (focal * valid[..., None]).sum() / normalizer,
        "loss_bbox": F.l1_loss(pred, tgt, reduction="none").sum() / normalizer,
        "loss_giou": (1 - giou).sum() / normalizer,
    }


def denoising_losses(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    queries: DenoisingQueries,
    num_boxes: float,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    all_layers: bool = True,
) -> Dict[str, torch.Tensor]:
    """Unweighted denoising losses of every decoder layer.

    Per layer: the sigmoid focal loss over the C classes of every real denoising slot (target:
    its object's class for positives, "no object", i.e. all zeros, for contrastive negatives;
    padding slots carry no loss), and L1 plus GIoU between the positives' boxes and their
    objects. All three are divided by ``num_boxes * G`` (G groups each reconstruct every object
    once), as DN-DETR and DINO normalise them.

    Args:
        logits (Tensor): (L, B, N, C) logits of the denoising slots.
        boxes (Tensor): (L, B, N, 4) predicted cxcywh boxes.
        queries (DenoisingQueries): the queries these outputs belong to.
        num_boxes (float): average objects per process (``SetCriterion.get_num_boxes``).
        focal_alpha, focal_gamma (float): focal loss parameters.
        all_layers (bool): also the auxiliary layers 0 .. L-2 (deep supervision).

    Returns:
        dict[str, Tensor]: ``loss_class_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` for the last
        layer and ``loss_*_dn_{i}`` for layer i < L - 1 when ``all_layers``.
    """
    num_layers = logits.shape[0]
    normalizer = num_boxes * queries.num_groups
    layers = range(num_layers) if all_layers else [num_layers - 1]
    losses = {}
    for i in layers:
        layer = _layer_losses(logits[i], boxes[i], queries, normalizer, focal_alpha, focal_gamma)
        suffix = "" if i == num_layers - 1 else f"_{i}"
        losses.update({denoising_loss_key(k + suffix): v for k, v in layer.items()})
    return losses
