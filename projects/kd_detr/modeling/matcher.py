# Copyright (c) kd_detr contributors.
"""Hungarian matching between predicted and ground-truth boxes (one assignment per image)."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost", "softmax_class_cost"]


def softmax_class_cost(logits, labels):
    """DETR's class cost: minus the softmax probability of the target class.

    Args:
        logits (Tensor): (Q, C + 1) logits, the last one being "no object".
        labels (Tensor): (T,) int64 target classes in [0, C).

    Returns:
        Tensor: (Q, T) cost.
    """
    return -logits.softmax(-1)[:, labels]


def focal_class_cost(logits, labels, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-8):
    """Focal class cost of Deformable/DAB-DETR: the focal loss of predicting the target class
    minus the focal loss of not predicting it.

    Args:
        logits (Tensor): (Q, C) sigmoid logits (no background logit).
        labels (Tensor): (T,) int64 target classes in [0, C).

    Returns:
        Tensor: (Q, T) cost.
    """
    prob = logits.sigmoid()[:, labels]
    pos = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising a weighted sum of costs:
    ``cost_class * class_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``.

    Images are matched independently; with more targets than queries only ``Q`` targets are
    matched. The module has no parameters and runs without gradients.

    Args:
        cost_class (float): weight of the class cost.
        cost_bbox (float): weight of the L1 distance between normalised cxcywh boxes.
        cost_giou (float): weight of minus the generalized IoU.
        use_focal (bool): focal class cost on sigmoid logits (Deformable/DAB-DETR, DINO) instead
            of minus the softmax probability (DETR).
        focal_alpha (float): alpha of the focal cost.
        focal_gamma (float): gamma of the focal cost.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        use_focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.use_focal = use_focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits, boxes, labels, tgt_boxes):
        """
        Args:
            logits (Tensor): (Q, K) logits of one image (K = C + 1 for softmax, C for focal).
            boxes (Tensor): (Q, 4) predicted normalised cxcywh boxes.
            labels (Tensor): (T,) target classes.
            tgt_boxes (Tensor): (T, 4) target normalised cxcywh boxes.

        Returns:
            Tensor: (Q, T) float32 cost.
        """
        logits, boxes, tgt_boxes = logits.float(), boxes.float(), tgt_boxes.float()
        if self.use_focal:
            cls = focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        else:
            cls = softmax_class_cost(logits, labels)
        l1 = torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_class * cls + self.cost_bbox * l1 - self.cost_giou * giou

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs (dict): "pred_logits" (B, Q, K) and "pred_boxes" (B, Q, 4) normalised cxcywh.
            targets (list[dict]): per image, "labels" (T_i,) int64 and "boxes" (T_i, 4)
                normalised cxcywh.

        Returns:
            list[tuple[Tensor, Tensor]]: per image, (query indices, target indices), both int64 on
            the CPU with length ``min(Q, T_i)``; query ``idx_q[k]`` is matched to ``idx_t[k]``.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        indices = []
        for i, tgt in enumerate(targets):
            if len(tgt["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[i], boxes[i], tgt["labels"], tgt["boxes"])
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    f"HungarianMatcher: non-finite matching cost for image {i} "
                    "(NaN/inf logits or boxes, or degenerate target boxes)"
                )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def extra_repr(self):
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, use_focal={self.use_focal}"
        )
