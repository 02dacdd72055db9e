# Copyright (c) kd_detr contributors.
"""D3ETR, decoder distillation for detection transformers (Chen et al., arXiv 2211.09768,
IJCAI 2024), for DETR-family students: its MixMatcher's prediction distillation and, on models
whose decoders return attention maps (DETR, DAB-DETR, Deformable DETR, DINO), its attention-map
distillation.

Notation: student layer l (of L_s), teacher layer t(l) = max(0, l + L_t - L_s) (layer by layer
for equal depths, the final layers aligned otherwise; see
:func:`~kd_detr.distill.detr_distill.teacher_layer`), K logits (C sigmoid, C + 1 softmax with
background last), n counts summed over all ranks and divided by the world size (clamped at 1).
Over a set P of (student query, teacher query) pairs of one layer, with the soft cross-entropy
CE of DETRDistill (:func:`~kd_detr.distill.detr_distill.soft_class_loss`: sigmoid models
sum_c BCE(z_s, sigmoid(z_t)), softmax models -sum_k softmax(z_t)_k log softmax(z_s)_k):

    cls = sum_P CE(z_s, z_t) / n_P,  l1 = sum_P |b_s - b_t|_1 / n_P,
    giou = sum_P (1 - GIoU(b_s, b_t)) / n_P,  weighted 1 / 5 / 2.

With the layer's self-attention maps A (B, h, ., .) and cross-attention maps X (B, h, ., S) over
the S encoder-memory tokens (``KDContext.attention_maps``; per head, each row a softmax, or for
deformable decoders the sampling weights scattered bilinearly onto the multi-scale tokens, see
:func:`~kd_detr.modeling.transformer.ms_deform_attn.sampling_attention_map`), P_b
the pairs (s_i, t_i) of image b, n_b = |P_b|, S_b the tokens padded in neither model:

    self_attn = sum_b sum_h sum_{i, j in P_b} (A_s[b, h, s_i, s_j] - A_t[b, h, t_i, t_j])^2
                / (h sum_b n_b^2),                                       weighted 1e4;
    cross_attn = sum_b sum_h sum_{k in S_b} (sum_{i in P_b} X_s[b, h, s_i, k]
                 - sum_{i in P_b} X_t[b, h, t_i, k])^2 / (h sum_b |S_b|),  weighted 1e3:

the MSE of the paired queries' self-attention block (each model's maps restricted to its
paired queries, in pair order) and of the memory map the paired queries' cross-attention adds
up to. The maps are compared head by head when both models have the same number of heads,
else both are averaged over their heads (h = 1; head i of one model has no counterpart in the
other); the cross-attention term needs both models to attend over one token grid (a runtime
error names the two grids otherwise).

MixMatcher forms P two ways, each giving its own losses:

* Adaptive matching (``loss_kd_d3etr_adaptive_{cls,l1,giou,self_attn,cross_attn}[_l]``): the
  student's Q detection queries of layer l are matched one-to-one to the teacher's N
  predictions of layer t(l), the teacher's predictions acting as soft ground truth, by a
  Hungarian matching with cost 1 * CE + 5 * L1 - 2 * GIoU
  (:class:`~kd_detr.distill.detr_distill.SoftLabelHungarianMatcher`); n_P = min(Q, N) pairs per
  image. The attention maps are the student's detection queries' and the teacher's.
* Fixed matching (``loss_kd_d3etr_fixed_{cls,l1,giou,self_attn,cross_attn}[_l]``): the student
  also decodes the teacher's N detection queries as an auxiliary group that does not interact
  with its own queries (KD-DETR's "specific" points, ``MODEL.KD.POINTS consistent`` with
  ``MODEL.KD.SPECIFIC.ENABLED``); its output i of layer l is paired with the teacher's
  prediction i of layer t(l); n_P = N per image. The student's maps are the group's own (its
  block of a masked pass, or its own pass).

Sources: the paper's abstract and Figure 2 (two query groups, the student's and the teacher's,
sharing the student's decoder without interaction, the second used in training only; adaptive
matching on the first, fixed matching on the second; distillation of decoder predictions,
self-attention and cross-attention maps). The loss forms, the 1 / 5 / 2 weights (both
matchings), the 1 / 5 / 2 matching costs, every decoder layer, the sigmoid soft BCE and the
attention terms (per-head self-attention MSE of the matched queries' block, weight 1e4; MSE of
the cross-attention summed over the queries onto the token grid, weight 1e3; both matchings)
come from TPRD's D3ETR re-implementation (xingyitong1/TPRD, projects/deformable_detr/D3DETR:
distill_criterion.py loss_attn_distill; D3DETR_TPRD/attention.py attn_map_to_flat_grid;
cfg_distill/D3DETR weight_dict *_loss_self_attn / *_loss_cross_attn); the paper's full text was
not available here to check them against. Deviations: TPRD's cross-attention maps are
Deformable DETR's sampling weights scattered onto the multi-scale token grid (at x w_l, without
the half-cell shift of the bilinear sampling) and summed over all queries; ours are the standard
cross-attention of DETR / DAB-DETR, or the sampling weights of Deformable DETR / DINO scattered
where the kernel reads them, summed over the paired queries (all of them when Q = N, as in the
recipes), and the mean leaves padded tokens out. RT-DETR and D-FINE return no maps: their
attention weights must be 0 (checked at start-up).
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

__all__ = ["D3ETRLoss", "add_d3etr_config", "attention_sums", "fixed_pairs"]

_KEYS = ("pred_logits", "pred_boxes")
_FIXED = "MODEL.KD.D3ETR.FIXED_MATCHING"
_ATTN = "MODEL.KD.D3ETR.SELF_ATTN_WEIGHT / CROSS_ATTN_WEIGHT"


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
    # Attention-map distillation, both matchings, every decoder layer (TPRD's D3ETR
    # weight_dict: distill_loss_self_attn / teacher_loss_self_attn 10000.0, distill_loss_cross_attn
    # / teacher_loss_cross_attn 1000.0): MSE of the paired queries' decoder self-attention maps,
    # and of the memory maps their cross-attention sums to. Needs decoders that return maps in
    # both models (DETR, DAB-DETR, Deformable DETR, DINO); 0 turns a term off (RT-DETR and
    # D-FINE have no maps: set both to 0 there).
    d.SELF_ATTN_WEIGHT = 10000.0
    d.CROSS_ATTN_WEIGHT = 1000.0


def fixed_pairs(batch_size: int, num: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed matching: query i with query i, for every image (int64 index pairs on the CPU)."""
    index = torch.arange(num, dtype=torch.int64)
    return [(index, index) for _ in range(batch_size)]


def _same_heads(student: torch.Tensor, teacher: torch.Tensor):
    """Per-head maps (B, h, ., .) of both models when the head counts agree, else both
    averaged over their heads (h = 1): the mean of softmax rows is still a distribution over
    the same keys, while head i of one model has no counterpart in the other."""
    if student.shape[1] == teacher.shape[1]:
        return student, teacher
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def attention_sums(
    student: Dict, teacher: Dict, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    padding, weights: Sequence[float] = (1.0, 1.0),
):  # fmt: skip
    """Squared errors of one layer's attention maps over the pairs P_b of every image b.

    Args:
        student (dict): "self_attn" (B, h_s, Q, Q), "cross_attn" (B, h_s, Q, S).
        teacher (dict): "self_attn" (B, h_t, N, N), "cross_attn" (B, h_t, N, S).
        pairs (list): per image (student query indices (n_b,), teacher query indices (n_b,)).
        padding (Tensor or None): (B, S) True on memory tokens padded in either model (None:
            no cross-attention term).
        weights: (self, cross); a 0 skips that part (its sum is None).

    Returns:
        tuple: ((self sum, self count), (cross sum, cross count)) with h the head count
        compared (h_s if h_s = h_t, else 1: head-averaged maps):
        self = sum_b sum_h sum_{i, j in P_b} (A_s[b, h, s_i, s_j] - A_t[b, h, t_i, t_j])^2 over
        h sum_b n_b^2; cross = sum_b sum_h sum_k (sum_{i in P_b} X_s[b, h, s_i, k] -
        sum_{i in P_b} X_t[b, h, t_i, k])^2 over the tokens k not padded, over h sum_b S_b.
    """
    device = student["self_attn"].device
    self_sum = cross_sum = None
    self_count = cross_count = 0
    if weights[0]:
        s_all, t_all = _same_heads(student["self_attn"].float(), teacher["self_attn"].float())
        self_sum = s_all.new_zeros(())
        for b, (s_idx, t_idx) in enumerate(pairs):
            s_idx, t_idx = s_idx.to(device), t_idx.to(device)
            s_block = s_all[b][:, s_idx][:, :, s_idx]
            t_block = t_all[b][:, t_idx][:, :, t_idx].detach()
            self_sum = self_sum + (s_block - t_block).pow(2).sum()
            self_count += s_all.shape[1] * len(s_idx) ** 2
    if weights[1]:
        s_all, t_all = _same_heads(student["cross_attn"].float(), teacher["cross_attn"].float())
        if s_all.shape[-1] != t_all.shape[-1]:
            raise RuntimeError(
                f"D3ETRLoss: the student's cross-attention covers {s_all.shape[-1]} memory tokens,"
                f" the teacher's {t_all.shape[-1]}: the maps must cover one token grid"
            )
        cross_sum = s_all.new_zeros(())
        for b, (s_idx, t_idx) in enumerate(pairs):
            keep = ~padding[b].to(device)
            s_map = s_all[b][:, s_idx.to(device)].sum(1)[:, keep]
            t_map = t_all[b][:, t_idx.to(device)].sum(1)[:, keep].detach()
            cross_sum = cross_sum + (s_map - t_map).pow(2).sum()
            cross_count += s_all.shape[1] * int(keep.sum())
    return (self_sum, self_count), (cross_sum, cross_count)


@KD_LOSS_REGISTRY.register()
class D3ETRLoss(KDTerm):
    """D3ETR (``MODEL.KD.LOSSES ['D3ETRLoss']``, keys under ``MODEL.KD.D3ETR``; see the module
    doc). The class type is the student's (``MODEL.DETR.USE_FOCAL_LOSS``)."""

    @configurable
    def __init__(
        self, *, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
        match_costs: Sequence[float] = (1.0, 5.0, 2.0), adaptive: bool = True,
        fixed: bool = True, softmax: bool = False, self_attn_weight: float = 0.0,
        cross_attn_weight: float = 0.0,
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
        if self_attn_weight < 0 or cross_attn_weight < 0:
            raise ValueError(
                f"D3ETRLoss: {_ATTN} must be >= 0, got {self_attn_weight}, {cross_attn_weight}"
            )
        self.attn_weights = (float(self_attn_weight), float(cross_attn_weight))
        inputs = {"detections", "points"} if self.fixed else {"detections"}
        if any(self.attn_weights):
            inputs.add("attention")
        self.inputs = frozenset(inputs)

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
            "self_attn_weight": d.SELF_ATTN_WEIGHT, "cross_attn_weight": d.CROSS_ATTN_WEIGHT,
        }  # fmt: skip

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Check both models are DETR-family models of one classifier type (with box queries
        for fixed matching, with decoder attention maps for the attention terms).

        Raises:
            ValueError: naming D3ETRLoss, the model's class and what it lacks.
        """
        check_detr_models("D3ETRLoss", student, teacher, _FIXED if self.fixed else "")
        if not any(self.attn_weights):
            return
        for role, model in (("student", student), ("teacher", teacher)):
            if not getattr(model, "decoder_attention_maps", False):
                raise ValueError(
                    f"D3ETRLoss ({_ATTN} > 0) distils decoder attention maps, but the {role} "
                    f"({type(model).__name__}) does not return them (its decoder is not one "
                    "that does). Use DETR, DAB-DETR, Deformable DETR or DINO teachers and "
                    "students, or set MODEL.KD.D3ETR.SELF_ATTN_WEIGHT 0 and "
                    "MODEL.KD.D3ETR.CROSS_ATTN_WEIGHT 0"
                )

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

    def _attention_losses(
        self, kind: str, student: Dict, teacher: Dict, pairs, padding, layer: int, num_layers: int
    ) -> Dict[str, torch.Tensor]:
        """The weighted self- / cross-attention losses of one layer's pairs (see
        :func:`attention_sums`); ``student`` / ``teacher`` hold that layer's maps."""
        sums = attention_sums(student, teacher, pairs, padding, self.attn_weights)
        device = student["self_attn"].device
        suffix = "" if layer == num_layers - 1 else f"_{layer}"
        losses = {}
        for name, weight, (value, count) in zip(("self_attn", "cross_attn"), self.attn_weights,
                                                sums):  # fmt: skip
            if weight:
                losses[f"loss_kd_d3etr_{kind}_{name}{suffix}"] = (
                    weight * value / global_count(count, device)
                )
        return losses

    def _maps(self, context: KDContext, group=None):
        """Both models' attention maps: the student's detection queries (``group`` None) or its
        extra group ``group``, and the teacher's detection queries; plus the padding of the
        memory tokens both attend over (checked to be one grid)."""
        s_maps = context.attention_maps("student")
        s_maps = s_maps["layers"] if group is None else s_maps["groups"][group]
        t_maps = context.attention_maps("teacher")["layers"]
        s_mem = context.encoder_memory("student")
        t_mem = context.encoder_memory("teacher")
        if s_mem["spatial_shapes"] != t_mem["spatial_shapes"] and self.attn_weights[1]:
            raise RuntimeError(
                f"D3ETRLoss (MODEL.KD.D3ETR.CROSS_ATTN_WEIGHT > 0) compares cross-attention "
                f"maps over the memory tokens, but the student attends over a "
                f"{s_mem['spatial_shapes']} grid and the teacher over {t_mem['spatial_shapes']} "
                "(different backbone strides or input sizes): give both models the same "
                "feature map (MODEL.DETR.IN_FEATURE, SIZE_DIVISIBILITY) or set "
                "MODEL.KD.D3ETR.CROSS_ATTN_WEIGHT 0"
            )
        padding = s_mem["padding_mask"] | t_mem["padding_mask"] if self.attn_weights[1] else None
        return s_maps, t_maps, padding

    def _matched_layers(self, kind: str, student: Dict, teacher: Dict, maps, pairs_of):
        """Losses of every student layer l against teacher layer t(l): predictions (L_s, B, ., .)
        and (L_t, B, N, .), ``maps`` from :meth:`_maps` (or None), ``pairs_of(s_out, t_out)``
        the layer's pairs."""
        num_s, num_t = student["pred_logits"].shape[0], teacher["pred_logits"].shape[0]
        losses = {}
        for layer in range(num_s):
            t_layer = teacher_layer(layer, num_s, num_t)
            s_out = {k: student[k][layer] for k in _KEYS}
            t_out = {k: teacher[k][t_layer] for k in _KEYS}
            pairs = pairs_of(s_out, t_out)
            losses.update(self._layer_losses(kind, s_out, t_out, pairs, layer, num_s))
            if maps is not None:
                s_maps, t_maps, padding = maps
                losses.update(self._attention_losses(
                    kind, {k: v[layer] for k, v in s_maps.items()},
                    {k: v[t_layer] for k, v in t_maps.items()}, pairs, padding, layer, num_s,
                ))  # fmt: skip
        return losses

    def adaptive_losses(self, context: KDContext) -> Dict[str, torch.Tensor]:
        """Adaptive matching of every student layer: the student's detection queries
        (L_s, B, Q, .) against the teacher's (L_t, B, N, .), Hungarian-matched per layer."""

        def hungarian(s_out, t_out):
            targets = [{"labels": t_out["pred_logits"][b], "boxes": t_out["pred_boxes"][b]}
                       for b in range(t_out["pred_logits"].shape[0])]  # fmt: skip
            return self.matcher({k: v.detach() for k, v in s_out.items()}, targets)

        maps = self._maps(context) if any(self.attn_weights) else None
        return self._matched_layers("adaptive", context.student_outputs["layers"],
                                    context.teacher_detections, maps, hungarian)  # fmt: skip

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
        batch_size, num = teacher["pred_logits"].shape[1:3]
        if tuple(student["pred_logits"].shape[1:3]) != (batch_size, num):
            raise RuntimeError(
                f"D3ETRLoss ({_FIXED}): the 'specific' group has "
                f"{tuple(student['pred_logits'].shape[1:3])} (images, queries), the teacher's "
                f"detections ({batch_size}, {num}); the group must be the teacher's queries"
            )
        pairs = fixed_pairs(batch_size, num)
        maps = None
        if any(self.attn_weights):  # the group's index among the student's extra groups
            maps = self._maps(context, [p.name for p in context.pairs].index("specific"))
        return self._matched_layers("fixed", student, teacher, maps, lambda *_: pairs)

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        with full_precision(context):
            losses = self.adaptive_losses(context) if self.adaptive else {}
            if self.fixed:
                losses.update(self.fixed_losses(context))
        return losses

    def extra_repr(self):
        return (
            f"weights={self.weights}, softmax={self.softmax}, adaptive={self.adaptive}, "
            f"fixed={self.fixed}, attention_weights={self.attn_weights}"
        )
