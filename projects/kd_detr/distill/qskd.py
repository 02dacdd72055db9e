# Copyright (c) kd_detr contributors.
"""QSKD, knowledge distillation via query selection (Liu et al., arXiv 2409.06443), for
DETR-family students.

Per student decoder layer l and teacher layer t(l) (the same depth from the end, see
:func:`~kd_detr.distill.detr_distill.teacher_layer`), with each model's own Hungarian matching of
that layer to the ground truth:

* Group query selection: a model's queries split into positives (matched to an object),
  hard negatives (unmatched, best GIoU with an object > ``giou_threshold``, 0 by default) and
  the rest (not distilled).
* LAPD, local alignment prediction distillation (``loss_kd_qskd_{cls,l1,giou}[_l]``): pairs
  (student query, teacher query) are formed inside each group only: positives matched to the
  same object, hard negatives by a Hungarian matching between the two models' hard negatives
  (cost 1 * soft-CE + 5 * L1 - 2 * GIoU). Over the pairs P: cls = sum_P CE(z_s, z_t) / n_P
  (the soft cross-entropy of DETRDistill: BCE against sigmoid(z_t) summed over classes, or
  -sum p_t log p_s for softmax models), l1 = sum_P |b_s - b_t|_1 / n_P,
  giou = sum_P (1 - GIoU) / n_P; weights 1 / 5 / 2.
* AGFD, attention-guided feature distillation (``loss_kd_qskd_agfd[_l]``): the teacher's
  selected queries k (positives with the GIoU to their object, hard negatives with their best
  GIoU g_k) weight their attention over the teacher's encoder memory,
  a_k = softmax_s(h_k . F_t,s / sqrt(d_t)) over the tokens that are not padding (h_k the
  teacher's layer-t hidden state); m = mean_k (1 + g_k) a_k, divided by max(max_s m, 0.01)
  (zero in an image without selected queries); loss = w sum (m (F_t - A(F_s)))^2 /
  (n_tokens d_t), A a linear adapter d_s -> d_t when the widths differ; w = 100.

Counts n are summed over all ranks and divided by the world size (clamped at 1), so averaging
the ranks' losses equals one process holding the whole batch.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import CONFIG_EXTENSION_REGISTRY
from ..modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .context import KDContext
from .detr_distill import (
    SoftLabelHungarianMatcher,
    check_detr_models,
    full_precision,
    global_count,
    masked_memory_loss,
    matched_prediction_sums,
    teacher_layer,
)
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = ["QSKDLoss", "add_qskd_config", "select_queries"]

_EMPTY = torch.empty(0, dtype=torch.int64)


@CONFIG_EXTENSION_REGISTRY.register(name="distill_qskd")
def add_qskd_config(cfg):
    """Add ``MODEL.KD.QSKD`` (the ``QSKDLoss`` term)."""
    q = cfg.MODEL.KD.QSKD = CN()
    # LAPD weights of the soft class, L1 and GIoU losses (TPRD's QSKD reimplementation
    # weight_dict: distill_loss_class 1.0, distill_loss_bbox 5.0, distill_loss_giou 2.0).
    q.CLS_WEIGHT = 1.0
    q.L1_WEIGHT = 5.0
    q.GIOU_WEIGHT = 2.0
    # Costs of the Hungarian matching between the two models' hard negatives (TPRD's
    # distill_matcher: class 1.0, bbox 5.0, giou 2.0).
    q.MATCH_COST_CLASS = 1.0
    q.MATCH_COST_BBOX = 5.0
    q.MATCH_COST_GIOU = 2.0
    # A query not matched to an object is a hard negative when its best GIoU with an object
    # exceeds this (the paper's group query selection; TPRD: giou_threshold 0).
    q.GIOU_THRESHOLD = 0.0
    # AGFD weight per layer (TPRD weight_dict: target_aware_loss 100.0); 0 disables AGFD.
    q.AGFD_WEIGHT = 100.0


def select_queries(
    boxes: torch.Tensor, targets: Dict, matching: Tuple, threshold: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group query selection of one image.

    Args:
        boxes (Tensor): (Q, 4) cxcywh predicted boxes.
        targets (dict): "boxes" (T, 4) cxcywh.
        matching (tuple): (query indices, target indices) of the Hungarian matching.
        threshold (float): GIoU above which an unmatched query is a hard negative.

    Returns:
        tuple: hard-negative query indices (int64, CPU), their best GIoU, and the GIoU of every
        matched query with its object (in ``matching`` order).
    """
    gt = targets["boxes"].to(boxes.device).float()
    if len(gt) == 0:
        return _EMPTY, boxes.new_zeros(0), boxes.new_zeros(0)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(gt))
    src, tgt = matching
    matched_giou = giou[src.to(boxes.device), tgt.to(boxes.device)]
    best = giou.amax(-1)
    unmatched = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    unmatched[src.to(boxes.device)] = False
    hard = torch.nonzero(unmatched & (best > threshold)).flatten()
    return hard.cpu(), best[hard], matched_giou


@KD_LOSS_REGISTRY.register()
class QSKDLoss(KDTerm):
    """QSKD (``MODEL.KD.LOSSES ['QSKDLoss']``, keys under ``MODEL.KD.QSKD``; see the module doc).
    The class type is the student's (``MODEL.DETR.USE_FOCAL_LOSS``)."""

    @configurable
    def __init__(
        self, *, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
        match_costs: Sequence[float] = (1.0, 5.0, 2.0), giou_threshold: float = 0.0,
        agfd_weight: float = 100.0, softmax: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.weights = (float(cls_weight), float(l1_weight), float(giou_weight))
        self.softmax = bool(softmax)
        self.matcher = SoftLabelHungarianMatcher(*match_costs, softmax=self.softmax)
        self.giou_threshold = float(giou_threshold)
        self.agfd_weight = float(agfd_weight)
        inputs = {"detections", "targets"}
        if self.agfd_weight:
            inputs.add("encoder_memory")
        self.inputs = frozenset(inputs)
        self.adapter: Optional[nn.Module] = None
        self._matchers: Tuple = ()  # (student matcher, teacher matcher), set by bind

    @classmethod
    def from_config(cls, cfg):
        q = cfg.MODEL.KD.QSKD
        detr = cfg.MODEL.get("DETR")
        return {
            "cls_weight": q.CLS_WEIGHT, "l1_weight": q.L1_WEIGHT, "giou_weight": q.GIOU_WEIGHT,
            "match_costs": (q.MATCH_COST_CLASS, q.MATCH_COST_BBOX, q.MATCH_COST_GIOU),
            "giou_threshold": q.GIOU_THRESHOLD, "agfd_weight": q.AGFD_WEIGHT,
            "softmax": detr is None or not detr.USE_FOCAL_LOSS,
        }  # fmt: skip

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Check both models are DETR-family models of one classifier type, keep their matchers
        and create the memory adapter d_s -> d_t when the widths differ.

        Raises:
            ValueError: naming QSKDLoss, the model's class and what it lacks.
        """
        check_detr_models("QSKDLoss", student, teacher)
        self._matchers = (student.criterion.matcher, teacher.criterion.matcher)
        widths = (student.hidden_dim, teacher.hidden_dim)
        if self.agfd_weight and self.adapter is None and widths[0] != widths[1]:
            self.adapter = nn.Linear(student.hidden_dim, teacher.hidden_dim)

    def _pairs(self, s_out: Dict, t_out: Dict, targets: List[Dict]):
        """LAPD pairs per image and the teacher's selected queries with their GIoU."""
        s_matcher, t_matcher = self._matchers
        s_match = s_matcher({k: v.detach() for k, v in s_out.items()}, targets)
        t_match = t_matcher(t_out, targets)
        pairs, selected = [], []
        for b, target in enumerate(targets):
            s_hard, _, _ = select_queries(
                s_out["pred_boxes"][b].detach(), target, s_match[b], self.giou_threshold
            )
            t_hard, t_hard_giou, t_pos_giou = select_queries(
                t_out["pred_boxes"][b], target, t_match[b], self.giou_threshold
            )
            # positives: the two models' queries matched to the same object
            t_of_object = dict(zip(t_match[b][1].tolist(), t_match[b][0].tolist()))
            pos = [(s, t_of_object[o]) for s, o in zip(*(m.tolist() for m in s_match[b]))
                   if o in t_of_object]  # fmt: skip
            src = [s for s, _ in pos]
            dst = [t for _, t in pos]
            if len(s_hard) and len(t_hard):
                s_sub = {k: v[b : b + 1, s_hard].detach() for k, v in s_out.items()}
                t_sub = [{"labels": t_out["pred_logits"][b, t_hard],
                          "boxes": t_out["pred_boxes"][b, t_hard]}]  # fmt: skip
                rows, cols = self.matcher(s_sub, t_sub)[0]
                src += s_hard[rows].tolist()
                dst += t_hard[cols].tolist()
            pairs.append((torch.as_tensor(src, dtype=torch.int64),
                          torch.as_tensor(dst, dtype=torch.int64)))  # fmt: skip
            selected.append((torch.cat([t_match[b][0], t_hard]),
                             torch.cat([t_pos_giou, t_hard_giou])))  # fmt: skip
        return pairs, selected

    @torch.no_grad()
    def attention_mask(self, context: KDContext, layer: int, selected: List) -> torch.Tensor:
        """AGFD's (B, S) mask of teacher layer ``layer`` from the selected queries."""
        memory = context.encoder_memory("teacher")
        feats = memory["memory"].float()  # (B, S, d_t)
        valid = ~memory["padding_mask"]
        hidden = context.teacher_detections["hidden_states"][layer].float()
        masks = feats.new_zeros(feats.shape[:2])
        for b, (queries, giou) in enumerate(selected):
            if len(queries) == 0:
                continue
            logits = hidden[b, queries.to(feats.device)] @ feats[b].T / feats.shape[-1] ** 0.5
            attention = logits.masked_fill(~valid[b], float("-inf")).softmax(-1)  # (k, S)
            mask = ((1 + giou.float())[:, None] * attention).mean(0)
            masks[b] = mask / mask.amax().clamp(min=1e-2)
        return masks

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        with full_precision(context):
            return self._losses(context)

    def _losses(self, context: KDContext) -> Dict[str, torch.Tensor]:
        student = context.student_outputs["layers"]
        teacher = context.teacher_detections
        num_s, num_t = student["pred_logits"].shape[0], teacher["pred_logits"].shape[0]
        losses = {}
        for layer in range(num_s):
            t_layer = teacher_layer(layer, num_s, num_t)
            s_out = {k: student[k][layer] for k in ("pred_logits", "pred_boxes")}
            t_out = {k: teacher[k][t_layer] for k in ("pred_logits", "pred_boxes")}
            pairs, selected = self._pairs(s_out, t_out, context.targets)
            sums = matched_prediction_sums(s_out, t_out, pairs, self.softmax)
            norm = global_count(sums[3], s_out["pred_logits"].device)
            suffix = "" if layer == num_s - 1 else f"_{layer}"
            for name, weight, value in zip(("cls", "l1", "giou"), self.weights, sums[:3]):
                losses[f"loss_kd_qskd_{name}{suffix}"] = weight * value / norm
            if self.agfd_weight:
                mask = self.attention_mask(context, t_layer, selected)
                value = masked_memory_loss(context, mask, self.adapter)
                losses[f"loss_kd_qskd_agfd{suffix}"] = self.agfd_weight * value
        return losses

    def extra_repr(self):
        return (
            f"weights={self.weights}, softmax={self.softmax}, giou_threshold="
            f"{self.giou_threshold}, agfd_weight={self.agfd_weight}"
        )
