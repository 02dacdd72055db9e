# Copyright (c) kd_detr contributors.
"""Set-prediction losses of DETR-family detectors (classification + L1 + GIoU on matched boxes)."""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou

__all__ = ["SetCriterion", "sigmoid_focal_loss"]


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Element-wise binary focal loss (Lin et al., 2017), not reduced.

    Args:
        logits (Tensor): (...,) logits.
        targets (Tensor): (...,) binary targets in {0, 1} (float).
        alpha (float): weight of positives (1 - alpha for negatives); a negative value disables it.
        gamma (float): focusing exponent.

    Returns:
        Tensor: loss with the shape of ``logits``.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _current_storage():
    try:
        return get_event_storage()
    except AssertionError:  # no EventStorage is active (eval, unit tests)
        return None


class SetCriterion(nn.Module):
    """Hungarian-matched losses for the final decoder layer and every auxiliary layer.

    Loss keys (unweighted; multiply by ``weight_dict``): ``loss_class``, ``loss_bbox``,
    ``loss_giou`` for the final layer and ``<key>_<i>`` for ``outputs["aux_outputs"][i]``.
    Box losses and the focal loss are normalised by the number of target boxes, summed over all
    ranks, averaged per rank and clamped at 1. Metrics (``class_error``, ``cardinality_error``) go
    to the active Detectron2 EventStorage, never into the returned dict.

    Two classification modes:

    * softmax (DETR): ``C + 1`` logits, the last meaning "no object"; weighted cross-entropy whose
      no-object weight is ``eos_coef`` (the weighted mean of PyTorch's ``cross_entropy``).
    * focal (Deformable/DAB-DETR, DINO; ``use_focal=True``): ``C`` sigmoid logits and no background
      logit; unmatched queries have all-zero targets. The loss is the focal loss summed over all
      queries and classes divided by ``num_boxes``, i.e. the reference code's
      ``loss.mean(1).sum() / num_boxes * num_queries``.

    Args:
        num_classes (int): C, number of object classes.
        matcher (nn.Module): returns per-image (query indices, target indices).
        weight_dict (dict[str, float]): weight of every loss key, aux keys included.
        eos_coef (float): cross-entropy weight of the no-object class (softmax mode).
        losses (Sequence[str]): subset of ("labels", "boxes").
        use_focal (bool): sigmoid focal classification instead of softmax cross-entropy.
        focal_alpha (float): focal loss alpha.
        focal_gamma (float): focal loss gamma.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "boxes"),
        use_focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        unknown = set(losses) - {"labels", "boxes"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.use_focal = use_focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @staticmethod
    def _src_index(indices, device):
        # (batch index, query index) of every matched prediction.
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src = torch.cat([src for src, _ in indices])
        return batch.to(device), src.to(device)

    def get_num_boxes(self, targets, device):
        """Average number of target boxes per rank (all-reduced when distributed), at least 1."""
        num_boxes = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_boxes)
        return torch.clamp(num_boxes / world_size, min=1).item()

    def loss_labels(self, outputs, targets, indices, num_boxes):
        """Classification loss over all queries: {"loss_class": scalar}."""
        logits = outputs["pred_logits"]  # (B, Q, K)
        batch, src = self._src_index(indices, logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
            logits.device
        )
        if self.use_focal:
            onehot = torch.zeros_like(logits)
            onehot[batch, src, labels] = 1
            loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
            return {"loss_class": loss.sum() / num_boxes}
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[batch, src] = labels
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_class": loss}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 (cxcywh) and GIoU losses of matched boxes: {"loss_bbox", "loss_giou"}."""
        batch, src = self._src_index(indices, outputs["pred_boxes"].device)
        pred = outputs["pred_boxes"][batch, src]  # (N, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)
        loss_bbox = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def layer_losses(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        """Losses of one decoder layer's ``outputs`` ("pred_logits", "pred_boxes")."""
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, num_boxes))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    @torch.no_grad()
    def _log_metrics(self, outputs, targets, indices):
        storage = _current_storage()
        if storage is None:
            return
        logits = outputs["pred_logits"]
        batch, src = self._src_index(indices, logits.device)
        if len(src) > 0:
            labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
            pred = logits[batch, src].argmax(-1).cpu()
            accuracy = (pred == labels.cpu()).float().mean() * 100
            storage.put_scalar("class_error", (100 - accuracy).item())
        if self.use_focal:
            num_pred = (logits.sigmoid().max(-1).values > 0.5).sum(1)
        else:
            num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        num_tgt = torch.as_tensor([len(t["labels"]) for t in targets], device=num_pred.device)
        storage.put_scalar("cardinality_error", (num_pred - num_tgt).abs().float().mean().item())

    def forward(self, outputs, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs (dict): "pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4) normalised cxcywh and
                optionally "aux_outputs", a list of dicts with the same two keys.
            targets (list[dict]): per image, "labels" (T_i,) int64 and "boxes" (T_i, 4)
                normalised cxcywh.

        Returns:
            dict[str, Tensor]: unweighted scalar losses, ``loss_*`` keys only.
        """
        num_boxes = self.get_num_boxes(targets, outputs["pred_logits"].device)
        indices = self.matcher(outputs, targets)
        losses = self.layer_losses(outputs, targets, indices, num_boxes)
        self._log_metrics(outputs, targets, indices)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets)
            aux_losses = self.layer_losses(aux, targets, aux_indices, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"use_focal={self.use_focal}, focal_alpha={self.focal_alpha}"
        )
