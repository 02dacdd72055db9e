# Copyright (c) kd_detr contributors.
"""D3ETR, decoder distillation for detection transformers (Chen et al., arXiv 2211.09768,
IJCAI 2024), for DETR-family students: the prediction distillation of its MixMatcher.

Notation: student layer l (of L_s), teacher layer t(l) = max(0, l + L_t - L_s) (layer by layer
for equal depths, the final layers aligned otherwise; see
:func:`~kd_detr.distill.detr_distill.teacher_layer`), K logits (C sigmoid, C + 1 softmax with
background last), n counts summed over all ranks and divided by the world size (clamped at 1).
Over a set P of (student query, teacher query) pairs of one layer, with the soft cross-entropy
CE of DETRDistill (:func:`~kd_detr.distill.detr_distill.soft_class_loss`: sigmoid models
sum_c BCE(z_s, sigmoid(z_t)), softmax models -sum_k softmax(z_t)_k log softmax(z_s)_k):

    cls = sum_P CE(z_s, z_t) / n_P,  l1 = sum_P |b_s - b_t|_1 / n_P,
    giou = sum_P (1 - GIoU(b_s, b_t)) / n_P,  weighted 1 / 5 / 2.

MixMatcher forms P two ways, each giving its own losses:

* Adaptive matching (``loss_kd_d3etr_adaptive_{cls,l1,giou}[_l]``): the student's Q detection
  queries of layer l are matched one-to-one to the teacher's N predictions of layer t(l), the
  teacher's predictions acting as soft ground truth, by a Hungarian matching with cost
  1 * CE + 5 * L1 - 2 * GIoU (:class:`~kd_detr.distill.detr_distill.SoftLabelHungarianMatcher`);
  n_P = min(Q, N) pairs per image.
* Fixed matching (``loss_kd_d3etr_fixed_{cls,l1,giou}[_l]``): the student also decodes the
  teacher's N detection queries as an auxiliary group that does not interact with its own
  queries (KD-DETR's "specific" points, ``MODEL.KD.POINTS consistent`` with
  ``MODEL.KD.SPECIFIC.ENABLED``); its output i of layer l is paired with the teacher's
  prediction i of layer t(l); n_P = N per image.

Sources: the paper's abstract and Figure 2 (two query groups, the student's and the teacher's,
sharing the student's decoder without interaction, the second used in training only; adaptive
matching on the first, fixed matching on the second; distillation of decoder predictions,
self-attention and cross-attention maps). The loss forms, the 1 / 5 / 2 weights (both
matchings), the 1 / 5 / 2 matching costs, every decoder layer and the sigmoid soft BCE come from
TPRD's D3ETR re-implementation (xingyitong1/TPRD, projects/deformable_detr/D3DETR and
cfg_distill/D3DETR); the paper's full text was not available here to check them against.

Not implemented (see docs/KD_ZOO.md): the attention-map terms (TPRD: MSE of the paired
queries' decoder self-attention maps, weight 1e4, and of the deformable cross-attention weights
scattered onto the token grid, weight 1e3), because the project's decoders do not return
attention weights.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import CONFIG_EXTENSION_REGISTRY
from .context import KDContext
from .detr_distill import (
    SoftLabelHungarianMatcher,
    check_detr_models,
    full_precision,
    global_count,
    matched_prediction_sums,
    teacher_layer,
)
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = ["D3ETRLoss", "add_d3etr_config", "fixed_pairs"]

_KEYS = ("pred_logits", "pred_boxes")
_FIXED = "MODEL.KD.D3ETR.FIXED_MATCHING"


@CONFIG_EXTENSION_REGISTRY.register(name="distill_d3etr")
def add_d3etr_config(cfg):
    """Add ``MODEL.KD.D3ETR`` (the ``D3ETRLoss`` term)."""
    d = cfg.MODEL.KD.D3ETR = CN()
    # Weights of the soft class, L1 and GIoU losses, the same for both matchings (TPRD's D3ETR
    # weight_dict: distill_loss_class / bbox / giou 1.0 / 5.0 / 2.0, teacher_loss_* the same).
    d.CLS_WEIGHT = 1.0
    d.L1_WEIGHT = 5.0
    d.GIOU_WEIGHT = 2.0
    # Adaptive matching costs, student -> teacher predictions (TPRD's DistillHungarianMatcher:
    # cost_class 1.0, cost_bbox 5.0, cost_giou 2.0).
    d.MATCH_COST_CLASS = 1.0
    d.MATCH_COST_BBOX = 5.0
    d.MATCH_COST_GIOU = 2.0
    # Adaptive matching: Hungarian pairs between the two models' detection queries of every
    # decoder layer (the paper's MixMatcher; TPRD: on).
    d.ADAPTIVE_MATCHING = True
    # Fixed matching: the student decodes the teacher's queries as an auxiliary group, paired
    # by index (the paper's MixMatcher; TPRD: on). Needs MODEL.KD.POINTS consistent with
    # SPECIFIC.ENABLED (the group is KD-DETR's "specific" points) and box-query models.
    d.FIXED_MATCHING = True


def fixed_pairs(batch_size: int, num: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed matching: query i with query i, for every image (int64 index pairs on the CPU)."""
    index = torch.arange(num, dtype=torch.int64)
    return [(index, index) for _ in range(batch_size)]


@KD_LOSS_REGISTRY.register()
class D3ETRLoss(KDTerm):
    """D3ETR (``MODEL.KD.LOSSES ['D3ETRLoss']``, keys under ``MODEL.KD.D3ETR``; see the module
    doc). The class type is the student's (``MODEL.DETR.USE_FOCAL_LOSS``)."""

    @configurable
    def __init__(
        self, *, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
        match_costs: Sequence[float] = (1.0, 5.0, 2.0), adaptive: bool = True,
        fixed: bool = True, softmax: bool = False,
    ):  # fmt: skip
        super().__init__()
        if not (adaptive or fixed):
            raise ValueError(
                "D3ETRLoss needs adaptive and/or fixed matching: MODEL.KD.D3ETR."
                "ADAPTIVE_MATCHING and MODEL.KD.D3ETR.FIXED_MATCHING are both False"
            )
        self.weights = (float(cls_weight), float(l1_weight), float(giou_weight))
        self.softmax = bool(softmax)
        self.matcher = SoftLabelHungarianMatcher(*match_costs, softmax=self.softmax)
        self.adaptive = bool(adaptive)
        self.fixed = bool(fixed)
        self.inputs = frozenset({"detections", "points"} if self.fixed else {"detections"})

    @classmethod
    def from_config(cls, cfg):
        d, kd = cfg.MODEL.KD.D3ETR, cfg.MODEL.KD
        if d.FIXED_MATCHING and (kd.POINTS != "consistent" or not kd.SPECIFIC.ENABLED):
            raise ValueError(
                f"D3ETRLoss: {_FIXED} decodes the teacher's queries in the student as the "
                "'specific' group of MODEL.KD.POINTS 'consistent': set MODEL.KD.POINTS "
                f"consistent and MODEL.KD.SPECIFIC.ENABLED True (got {kd.POINTS!r}, "
                f"{kd.SPECIFIC.ENABLED}), or set {_FIXED} False"
            )
        detr = cfg.MODEL.get("DETR")
        return {
            "cls_weight": d.CLS_WEIGHT, "l1_weight": d.L1_WEIGHT, "giou_weight": d.GIOU_WEIGHT,
            "match_costs": (d.MATCH_COST_CLASS, d.MATCH_COST_BBOX, d.MATCH_COST_GIOU),
            "adaptive": d.ADAPTIVE_MATCHING, "fixed": d.FIXED_MATCHING,
            "softmax": detr is None or not detr.USE_FOCAL_LOSS,
        }  # fmt: skip

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Check both models are DETR-family models of one classifier type (with box queries
        for fixed matching).

        Raises:
            ValueError: naming D3ETRLoss, the model's class and what it lacks.
        """
        check_detr_models("D3ETRLoss", student, teacher, _FIXED if self.fixed else "")

    def _layer_losses(
        self, kind: str, student: Dict, teacher: Dict, pairs, layer: int, num_layers: int
    ) -> Dict[str, torch.Tensor]:
        """The weighted cls / l1 / giou losses of one layer's pairs."""
        cls, l1, giou, count = matched_prediction_sums(student, teacher, pairs, self.softmax)
        norm = global_count(count, student["pred_logits"].device)
        suffix = "" if layer == num_layers - 1 else f"_{layer}"
        return {
            f"loss_kd_d3etr_{kind}_{name}{suffix}": weight * value / norm
            for name, weight, value in zip(("cls", "l1", "giou"), self.weights, (cls, l1, giou))
        }

    def adaptive_losses(self, context: KDContext) -> Dict[str, torch.Tensor]:
        """Adaptive matching of every student layer: the student's detection queries
        (L_s, B, Q, .) against the teacher's (L_t, B, N, .), Hungarian-matched per layer."""
        student = context.student_outputs["layers"]
        teacher = context.teacher_detections
        num_s, num_t = student["pred_logits"].shape[0], teacher["pred_logits"].shape[0]
        losses = {}
        for layer in range(num_s):
            t_layer = teacher_layer(layer, num_s, num_t)
            s_out = {k: student[k][layer] for k in _KEYS}
            t_out = {k: teacher[k][t_layer] for k in _KEYS}
            targets = [{"labels": t_out["pred_logits"][b], "boxes": t_out["pred_boxes"][b]}
                       for b in range(t_out["pred_logits"].shape[0])]  # fmt: skip
            pairs = self.matcher({k: v.detach() for k, v in s_out.items()}, targets)
            losses.update(self._layer_losses("adaptive", s_out, t_out, pairs, layer, num_s))
        return losses

    def fixed_losses(self, context: KDContext) -> Dict[str, torch.Tensor]:
        """Fixed matching of every student layer: the student's outputs on the teacher's queries
        (the "specific" group, (L_s, B, N, .)) against the teacher's (L_t, B, N, .), by index."""
        group = next((p for p in context.pairs if p.name == "specific"), None)
        if group is None:
            raise RuntimeError(
                f"D3ETRLoss ({_FIXED}) needs the 'specific' point group (the student's outputs "
                "on the teacher's queries): MODEL.KD.POINTS consistent with "
                "MODEL.KD.SPECIFIC.ENABLED True"
            )
        student, teacher = group.student, context.teacher_detections
        num_s, num_t = student["pred_logits"].shape[0], teacher["pred_logits"].shape[0]
        batch_size, num = teacher["pred_logits"].shape[1:3]
        if tuple(student["pred_logits"].shape[1:3]) != (batch_size, num):
            raise RuntimeError(
                f"D3ETRLoss ({_FIXED}): the 'specific' group has "
                f"{tuple(student['pred_logits'].shape[1:3])} (images, queries), the teacher's "
                f"detections ({batch_size}, {num}); the group must be the teacher's queries"
            )
        pairs = fixed_pairs(batch_size, num)
        losses = {}
        for layer in range(num_s):
            s_out = {k: student[k][layer] for k in _KEYS}
            t_out = {k: teacher[k][teacher_layer(layer, num_s, num_t)] for k in _KEYS}
            losses.update(self._layer_losses("fixed", s_out, t_out, pairs, layer, num_s))
        return losses

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        with full_precision(context):
            losses = self.adaptive_losses(context) if self.adaptive else {}
            if self.fixed:
                losses.update(self.fixed_losses(context))
        return losses

    def extra_repr(self):
        return (
            f"weights={self.weights}, softmax={self.softmax}, adaptive={self.adaptive}, "
            f"fixed={self.fixed}"
        )
