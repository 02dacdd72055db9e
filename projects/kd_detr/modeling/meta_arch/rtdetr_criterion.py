# Copyright (c) kd_detr contributors.
"""RT-DETR's losses: the varifocal (IoU-aware) classification loss plus DETR's L1 / GIoU box
losses, for Hungarian-matched queries and for denoising queries (known targets)."""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..box_ops import box_cxcywh_to_xyxy, paired_box_iou
from ..criterion import SetCriterion
from ..denoising import DenoisingQueries

__all__ = ["VarifocalCriterion", "denoising_targets", "varifocal_loss"]


def varifocal_loss(logits, target_score, onehot, alpha: float = 0.75, gamma: float = 2.0):
    """Element-wise varifocal loss (Zhang et al., VarifocalNet; RT-DETR's ``loss_vfl``).

    ``BCE(logits, q) * w`` with q the IoU of a matched query with its object at its class (0
    elsewhere) and ``w = alpha * sigmoid(logits)^gamma * (1 - onehot) + q`` (no gradient in w).

    Args:
        logits (Tensor): (..., C).
        target_score (Tensor): (..., C) IoU at the target class, 0 elsewhere.
        onehot (Tensor): (..., C) 1 at the target class of matched queries.

    Returns:
        Tensor: (..., C).
    """
    prob = logits.detach().sigmoid()
    weight = alpha * prob.pow(gamma) * (1 - onehot) + target_score
    return F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")


class VarifocalCriterion(SetCriterion):
    """:class:`SetCriterion` whose "loss_class" is the varifocal loss summed over queries and
    classes and divided by ``num_boxes`` (RT-DETR's ``loss.mean(1).sum() * Q / num_boxes``);
    ``focal_alpha`` / ``focal_gamma`` are its alpha (0.75) and gamma (2)."""

    def loss_labels(self, outputs, targets, indices, num_boxes):
        logits = outputs["pred_logits"]  # (B, Q, C)
        batch, src = self._src_index(indices, logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
            logits.device
        )
        pred = outputs["pred_boxes"][batch, src].detach()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)
        iou = paired_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
        onehot = torch.zeros_like(logits)
        onehot[batch, src, labels] = 1
        score = torch.zeros_like(logits)
        score[batch, src, labels] = iou.to(logits.dtype)
        loss = varifocal_loss(logits, score, onehot, self.focal_alpha, self.focal_gamma)
        return {"loss_class": loss.sum() / num_boxes}


def denoising_targets(
    queries: DenoisingQueries,
) -> Tuple[List[Dict[str, torch.Tensor]], List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Targets and fixed matching of the denoising queries: per image, its positive slots are
    matched to their objects (every group reconstructs every object once); negatives and padding
    slots are unmatched ("no object").

    Returns:
        tuple: per image {"labels" (P_i,), "boxes" (P_i, 4)} and (slot indices, arange(P_i)).
    """
    targets, indices = [], []
    for b in range(queries.positive.shape[0]):
        slots = queries.positive[b].nonzero(as_tuple=True)[0]
        targets.append(
            {"labels": queries.target_labels[b, slots], "boxes": queries.target_boxes[b, slots]}
        )
        indices.append((slots.cpu(), torch.arange(len(slots))))
    return targets, indices
