# Copyright (c) kd_detr contributors.
"""Class targets that a sigmoid (focal) DETR student can follow, from a teacher of another kind
(``MODEL.KD.POINTS "boxes"``, e.g. a Faster R-CNN teacher).

A DETR student decodes each group of distillation points as one set: the points of a group
attend to each other, as its detection queries do, and a set predictor learns to give one box
per object a high score and its duplicates a low one. A Faster R-CNN scores every box on its own
(duplicates are removed later by its NMS), trained with a softmax cross-entropy, so its targets
differ from a focal DETR teacher's in two ways:

* scale: near one-hot probabilities (~0.99 / ~1e-4, logits about +7 / -9 after the conversion
  to sigmoid targets) where a focal classifier stays near its prior for what it does not see
  (its class bias starts at probability 0.01); :func:`floor_class_probabilities` raises every
  target probability to at least a floor (``MODEL.KD.BOXES.MIN_CLASS_PROBABILITY``);
* duplicates: every proposal on an object is scored as that object;
  :func:`suppress_duplicate_targets` runs the teacher's class-wise NMS over the points of each
  group and image (``MODEL.KD.BOXES.CLASS_NMS_THRESH``) and sets the target of each suppressed
  (point, class) to the floor, so that the group's targets are the teacher's detections, one
  per object, as a set predictor's would be. The NMS ranks by the teacher's probability
  (``MODEL.KD.BOXES.CLASS_NMS_RANK "probability"``, as the teacher's own NMS) or by the
  probability times the IoU of the point's box with the teacher's refined box there
  (``"probability_x_fit"``): of near-equal scores (a softmax R-CNN gives ~0.99 to every box on
  an object) the point whose box already fits is kept, as a DETR's matching keeps the query whose
  box is closest.

Both act on sigmoid target logits (the student's classifier type), after the conversion of
:func:`~kd_detr.distill.class_mapping.convert_class_logits`.
"""
import math
from typing import Optional

import torch
from torchvision.ops import batched_nms

from ..modeling.box_ops import box_cxcywh_to_xyxy, paired_box_iou

__all__ = [
    "NMS_RANKS",
    "floor_class_probabilities",
    "probability_logit",
    "suppress_duplicate_targets",
]

NMS_RANKS = ("probability", "probability_x_fit")


def probability_logit(probability: float) -> float:
    """logit(p) = log(p / (1 - p)) for 0 < p < 1."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"a probability strictly between 0 and 1 is needed, got {probability}")
    return math.log(probability) - math.log1p(-probability)


def floor_class_probabilities(logits: torch.Tensor, min_probability: float) -> torch.Tensor:
    """Sigmoid class logits with every probability raised to at least ``min_probability``.

    Args:
        logits (Tensor): (..., C) sigmoid logits.
        min_probability (float): the floor; 0 leaves the logits unchanged.

    Returns:
        Tensor: (..., C) logits z' with sigmoid(z') = max(sigmoid(z), min_probability).
    """
    if min_probability <= 0:
        return logits
    return logits.clamp(min=probability_logit(min_probability))


def suppress_duplicate_targets(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    iou_threshold: float,
    min_probability: float,
    score_threshold: float = 0.0,
    point_boxes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Class-wise NMS over the points of each image: the target of each suppressed
    (point, class) becomes ``min_probability``.

    A (point, class) is suppressed when another point of the same image ranks higher for that
    class and has a box with IoU above ``iou_threshold`` with it, unless that point is
    suppressed itself (greedy NMS, ``torchvision.ops.batched_nms``). The rank is the probability
    p, or with ``point_boxes`` p times the IoU of the point's box with the teacher's box there.

    Args:
        logits (Tensor): (B, M, C) sigmoid target logits.
        boxes (Tensor): (B, M, 4) the teacher's boxes at the points, normalised cxcywh.
        iou_threshold (float): NMS IoU threshold, 0 < t < 1.
        min_probability (float): the target of suppressed pairs, 0 < p < 1.
        score_threshold (float): pairs with probability at or below this take no part (they
            neither suppress nor are suppressed).
        point_boxes (Tensor or None): (B, M, 4) or (1, M, 4) the points' own boxes, normalised
            cxcywh: rank by p x IoU(point box, teacher box); None: by p.

    Returns:
        Tensor: (B, M, C) logits, the input's dtype.
    """
    if not 0.0 < iou_threshold < 1.0:
        raise ValueError(f"the NMS IoU threshold must be in (0, 1), got {iou_threshold}")
    floor = probability_logit(min_probability)
    batch = logits.shape[0]
    xyxy = box_cxcywh_to_xyxy(boxes.float())
    out = logits.clone()
    probs = logits.float().sigmoid()
    rank = probs
    if point_boxes is not None:
        fit = paired_box_iou(box_cxcywh_to_xyxy(point_boxes.float()).expand_as(xyxy), xyxy)
        rank = probs * fit[..., None]
    for b in range(batch):
        point, cls = torch.nonzero(probs[b] > score_threshold, as_tuple=True)
        if point.numel() == 0:
            continue
        keep = batched_nms(xyxy[b, point], rank[b, point, cls], cls, iou_threshold)
        suppressed = torch.ones_like(point, dtype=torch.bool)
        suppressed[keep] = False
        out[b, point[suppressed], cls[suppressed]] = floor
    return out
