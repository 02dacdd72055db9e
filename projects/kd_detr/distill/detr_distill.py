# Copyright (c) kd_detr contributors.
"""DETRDistill (Chang et al., ICCV 2023) for DETR-family students: three terms, one module.

Notation: student layer l (of L_s), teacher layer t(l) = max(0, l + L_t - L_s) (layer by layer
for equal depths, the final layers aligned otherwise; with ``layer_by_layer`` False always the
teacher's final layer), K logits (C sigmoid, C + 1 softmax with background last), n counts summed
over all ranks and divided by the world size (clamped at 1).

(a) Hungarian-matching logits distillation (``loss_kd_detrdistill_{cls,l1,giou}[_l]``): the
    teacher's N predictions of layer t(l) are pseudo ground truth (soft class targets, no
    threshold by default; ``score_threshold`` keeps those whose best foreground score reaches
    it). The student's detection queries are matched one-to-one to them by a Hungarian matcher
    (``SoftLabelHungarianMatcher``) with cost 1 * soft-CE + 5 * L1 - 2 * GIoU; over the matched
    pairs P: cls = sum_P CE(z_s, z_t) / n_P, with CE the soft binary cross-entropy summed over
    classes (sigmoid: BCE(z_s, sigmoid(z_t))) or the soft cross-entropy -sum p_t log p_s
    (softmax), l1 = sum_P |b_s - b_t|_1 / n_P, giou = sum_P (1 - GIoU(b_s, b_t)) / n_P; weights
    1 / 5 / 2.
(b) Target-aware feature distillation (``loss_kd_detrdistill_feature[_t]``, every teacher layer
    t): the teacher's top-k (query, class) scores s (sigmoid, or softmax over the C + 1 logits
    restricted to foreground) times the query box's best IoU with the ground truth (s alone in an
    image without objects) weight the cosine similarities of the teacher's layer-t hidden states
    h with its encoder memory tokens F_t: m = max(sum_k c_k cos(h_k, F_t), 0.01), divided by its
    maximum over the image's tokens; loss = w sum (m (F_t - A(F_s)))^2 / (n_tokens d_t) over the
    tokens that are not padding, A a linear adapter d_s -> d_t when the widths differ.
(c) Query-prior assignment distillation (``loss_kd_detrdistill_assign_{class,bbox,giou}[_l]``):
    the student decodes the teacher's detection queries as an extra group (the "specific" group
    of ``MODEL.KD.POINTS consistent``); its layer-l outputs get the student's own detection
    losses and weights (criterion ``layer_losses``) with the teacher's layer-t(l) Hungarian
    assignment to the ground truth instead of a matching of their own, times ``assign_weight``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.utils import comm

from ..config import CONFIG_EXTENSION_REGISTRY
from ..modeling.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    generalized_box_iou,
    paired_generalized_box_iou,
)
from ..modeling.matcher import HungarianMatcher
from .context import KDContext
from .interface import missing_members
from .losses import all_reduce_sum
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = [
    "DETRDistillLoss",
    "SoftLabelHungarianMatcher",
    "add_detr_distill_config",
    "check_detr_models",
    "foreground_scores",
    "full_precision",
    "global_count",
    "masked_memory_loss",
    "matched_prediction_sums",
    "soft_class_loss",
    "teacher_layer",
]


@CONFIG_EXTENSION_REGISTRY.register(name="distill_detrdistill")
def add_detr_distill_config(cfg):
    """Add ``MODEL.KD.DETRDISTILL`` (the ``DETRDistillLoss`` term)."""
    d = cfg.MODEL.KD.DETRDISTILL = CN()
    # (a) weights of the soft class, L1 and GIoU losses on the matched predictions (official
    # student config: loss_cls_distill 1.0, loss_bbox_distill 5.0, loss_iou_distill 2.0).
    d.CLS_WEIGHT = 1.0
    d.L1_WEIGHT = 5.0
    d.GIOU_WEIGHT = 2.0
    # (a) matching costs student -> teacher predictions (official distill_assigner: soft
    # cross-entropy 1.0, L1 5.0, GIoU 2.0).
    d.MATCH_COST_CLASS = 1.0
    d.MATCH_COST_BBOX = 5.0
    d.MATCH_COST_GIOU = 2.0
    # (a) keep only teacher predictions whose best foreground score is >= this; 0 keeps all N
    # (official code: all predictions, no threshold).
    d.SCORE_THRESHOLD = 0.0
    # (a) student layer l against teacher layer l (official config is_layer_by_layer_distill
    # True); False: every student layer against the teacher's final layer.
    d.LAYER_BY_LAYER = True
    # (b) weight of the target-aware feature loss per teacher layer (TPRD's reimplementation:
    # 2.0; the official code adds it unweighted); 0 disables (b).
    d.FEATURE_WEIGHT = 2.0
    # (b) (query, class) scores per image that build the mask (official test_cfg max_per_img 100).
    d.TOPK = 100
    # (c) decode the teacher's queries in the student, supervised with the teacher's assignment
    # (official use_teacher_group True); needs MODEL.KD.POINTS consistent with SPECIFIC.ENABLED
    # and GENERAL.ENABLED False, and box-query models (not vanilla DETR).
    d.QUERY_PRIOR = True
    # (c) factor on the student's own detection loss weights (official: the head's losses as is).
    d.ASSIGN_WEIGHT = 1.0


def teacher_layer(layer: int, num_student: int, num_teacher: int, by_layer: bool = True) -> int:
    """The teacher layer paired with student layer ``layer``: the same depth from the end."""
    if not by_layer:
        return num_teacher - 1
    return max(0, layer + num_teacher - num_student)


def soft_class_loss(student_logits, teacher_logits, softmax: bool):
    """Per-pair soft cross-entropy of (..., K) logits against a teacher's, summed over classes:
    sigmoid: sum_c BCE(z_s, sigmoid(z_t)); softmax: -sum_c softmax(z_t) log_softmax(z_s)."""
    teacher_logits = teacher_logits.detach()
    if softmax:
        return -(teacher_logits.softmax(-1) * F.log_softmax(student_logits, -1)).sum(-1)
    target = teacher_logits.sigmoid()
    return F.binary_cross_entropy_with_logits(student_logits, target, reduction="none").sum(-1)


def _pairwise_soft_class_cost(student_logits, teacher_logits, softmax: bool):
    """(Q, K) x (T, K) -> (Q, T) :func:`soft_class_loss` of every pair."""
    if softmax:
        return -F.log_softmax(student_logits, -1) @ teacher_logits.softmax(-1).T
    # BCE(z, q) = softplus(z) - q z, summed over classes
    return F.softplus(student_logits).sum(-1)[:, None] - student_logits @ teacher_logits.sigmoid().T


class SoftLabelHungarianMatcher(HungarianMatcher):
    """The project's Hungarian matcher with another model's predictions as targets: each target's
    "labels" are its (K,) logits, and the class cost is :func:`soft_class_loss`."""

    def __init__(self, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, softmax=False):
        super().__init__(cost_class, cost_bbox, cost_giou, use_focal=not softmax)
        self.softmax = softmax

    def cost_matrix(self, logits, boxes, labels, tgt_boxes):
        logits, labels = logits.float(), labels.float()
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        cls = _pairwise_soft_class_cost(logits, labels, self.softmax)
        l1 = torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_class * cls + self.cost_bbox * l1 - self.cost_giou * giou


def global_count(count: float, device) -> torch.Tensor:
    """A count summed over all ranks, divided by the world size, at least 1."""
    total = all_reduce_sum(torch.tensor(float(count), device=device))
    return (total / comm.get_world_size()).clamp(min=1.0)


def matched_prediction_sums(
    student: Dict, teacher: Dict, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], softmax: bool
):
    """Sums over paired predictions of one layer: soft class CE, L1 and 1 - GIoU.

    Args:
        student, teacher (dict): "pred_logits" (B, Q or N, K), "pred_boxes" (B, ., 4).
        pairs (list): per image (student query indices, teacher query indices).

    Returns:
        tuple: (cls, l1, giou, number of pairs).
    """
    logits = student["pred_logits"]
    batch = torch.cat([torch.full_like(s, b) for b, (s, _) in enumerate(pairs)]).to(logits.device)
    s_idx = torch.cat([s for s, _ in pairs]).to(logits.device)
    t_idx = torch.cat([t for _, t in pairs]).to(logits.device)
    s_logits, t_logits = logits[batch, s_idx].float(), teacher["pred_logits"][batch, t_idx]
    s_boxes = student["pred_boxes"][batch, s_idx].float()
    t_boxes = teacher["pred_boxes"][batch, t_idx].detach().float()
    cls = soft_class_loss(s_logits, t_logits.float(), softmax).sum()
    l1 = (s_boxes - t_boxes).abs().sum()
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(s_boxes), box_cxcywh_to_xyxy(t_boxes))
    return cls, l1, (1 - giou).sum(), len(s_idx)


def check_detr_models(method: str, student, teacher, box_queries: str = "") -> None:
    """Stop at start-up when a model is not a DETR-family model, the classifier types differ or
    (``box_queries`` names what needs them) a model has no box queries."""
    for role, model in (("student", student), ("teacher", teacher)):
        name = type(model).__name__
        missing = [m for m in missing_members(model) if m != "keep_backbone_features"]
        if missing:
            raise ValueError(
                f"{method} (MODEL.KD.LOSSES) needs a DETR-family {role}, but the {role} ({name}) "
                f"lacks {', '.join(missing)} (detection queries, their outputs of every decoder "
                "layer and a Hungarian matcher): use a DETR, DAB-DETR, Deformable DETR or DINO"
            )
        if box_queries and not model.box_query_groups:
            raise ValueError(
                f"{method} ({box_queries}) decodes the teacher's queries in the student, but the "
                f"{role} ({name}) has no box queries to decode: use a DAB-DETR, Deformable DETR "
                f"or DINO {role}, or set {box_queries} False"
            )
    if bool(student.use_focal) != bool(teacher.use_focal):
        raise ValueError(
            f"{method} needs the same classifier type in both models: student "
            f"{type(student).__name__} use_focal={student.use_focal}, teacher "
            f"{type(teacher).__name__} use_focal={teacher.use_focal}"
        )


def full_precision(context: KDContext):
    """A block without autocast on the student's device: the terms compute in float32 (the
    matching costs, masks and sums of many small terms), whatever the step's AMP state."""
    device = context.student_outputs["layers"]["pred_logits"].device.type
    return torch.autocast(device_type=device, enabled=False)


def _layer_outputs(outputs: Dict, layer: int) -> Dict[str, torch.Tensor]:
    return {k: outputs[k][layer] for k in ("pred_logits", "pred_boxes")}


def _suffix(layer: int, num: int) -> str:
    return "" if layer == num - 1 else f"_{layer}"


def foreground_scores(logits: torch.Tensor, softmax: bool) -> torch.Tensor:
    """(..., C) foreground probabilities of (..., K) logits."""
    return logits.softmax(-1)[..., :-1] if softmax else logits.sigmoid()


@KD_LOSS_REGISTRY.register()
class DETRDistillLoss(KDTerm):
    """DETRDistill (``MODEL.KD.LOSSES ['DETRDistillLoss']``, keys under ``MODEL.KD.DETRDISTILL``;
    see the module doc). The class type is the student's (``MODEL.DETR.USE_FOCAL_LOSS``)."""

    @configurable
    def __init__(
        self, *, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
        match_costs: Sequence[float] = (1.0, 5.0, 2.0), score_threshold: float = 0.0,
        layer_by_layer: bool = True, feature_weight: float = 2.0, topk: int = 100,
        query_prior: bool = True, assign_weight: float = 1.0, softmax: bool = False,
    ):  # fmt: skip
        super().__init__()
        if topk < 1:
            raise ValueError(f"MODEL.KD.DETRDISTILL.TOPK must be >= 1, got {topk}")
        self.weights = (float(cls_weight), float(l1_weight), float(giou_weight))
        self.softmax = bool(softmax)
        self.matcher = SoftLabelHungarianMatcher(*match_costs, softmax=self.softmax)
        self.score_threshold = float(score_threshold)
        self.layer_by_layer = bool(layer_by_layer)
        self.feature_weight = float(feature_weight)
        self.topk = int(topk)
        self.query_prior = bool(query_prior)
        self.assign_weight = float(assign_weight)
        inputs = {"detections", "targets"}
        if self.feature_weight:
            inputs.add("encoder_memory")
        if self.query_prior:
            inputs.add("points")
        self.inputs = frozenset(inputs)
        self.adapter: Optional[nn.Module] = None
        self._models: Tuple = ()  # (student criterion, teacher matcher), set by bind

    @classmethod
    def from_config(cls, cfg):
        d, kd = cfg.MODEL.KD.DETRDISTILL, cfg.MODEL.KD
        if d.QUERY_PRIOR and (
            kd.POINTS != "consistent" or not kd.SPECIFIC.ENABLED or kd.GENERAL.ENABLED
        ):
            raise ValueError(
                "DETRDistillLoss: MODEL.KD.DETRDISTILL.QUERY_PRIOR decodes the teacher's queries "
                "as the 'specific' group of MODEL.KD.POINTS 'consistent': set MODEL.KD.POINTS "
                "consistent, MODEL.KD.SPECIFIC.ENABLED True and MODEL.KD.GENERAL.ENABLED False "
                f"(got {kd.POINTS!r}, {kd.SPECIFIC.ENABLED}, {kd.GENERAL.ENABLED}), or set "
                "QUERY_PRIOR False"
            )
        detr = cfg.MODEL.get("DETR")
        return {
            "cls_weight": d.CLS_WEIGHT, "l1_weight": d.L1_WEIGHT, "giou_weight": d.GIOU_WEIGHT,
            "match_costs": (d.MATCH_COST_CLASS, d.MATCH_COST_BBOX, d.MATCH_COST_GIOU),
            "score_threshold": d.SCORE_THRESHOLD, "layer_by_layer": d.LAYER_BY_LAYER,
            "feature_weight": d.FEATURE_WEIGHT, "topk": d.TOPK, "query_prior": d.QUERY_PRIOR,
            "assign_weight": d.ASSIGN_WEIGHT,
            "softmax": detr is None or not detr.USE_FOCAL_LOSS,
        }  # fmt: skip

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Check both models are DETR-family models of one classifier type (with box queries for
        QUERY_PRIOR); keep the student's criterion and the teacher's matcher; create the memory
        adapter d_s -> d_t when the widths differ.

        Raises:
            ValueError: naming DETRDistillLoss, the model's class and what it lacks.
        """
        prior = "MODEL.KD.DETRDISTILL.QUERY_PRIOR" if self.query_prior else ""
        check_detr_models("DETRDistillLoss", student, teacher, prior)
        self._models = (student.criterion, teacher.criterion.matcher)
        widths = (student.hidden_dim, teacher.hidden_dim)
        if self.feature_weight and self.adapter is None and widths[0] != widths[1]:
            self.adapter = nn.Linear(student.hidden_dim, teacher.hidden_dim)

    def _targets(self, teacher: Dict) -> Tuple[List[Dict], List[torch.Tensor]]:
        """The teacher's predictions as matcher targets (kept ones) and their query indices."""
        logits, boxes = teacher["pred_logits"], teacher["pred_boxes"]
        targets, kept = [], []
        for b in range(logits.shape[0]):
            keep = torch.arange(logits.shape[1], device=logits.device)
            if self.score_threshold > 0:
                best = foreground_scores(logits[b].float(), self.softmax).amax(-1)
                keep = keep[best >= self.score_threshold]
            targets.append({"labels": logits[b, keep], "boxes": boxes[b, keep]})
            kept.append(keep.cpu())
        return targets, kept

    def logit_losses(self, context: KDContext) -> Dict[str, torch.Tensor]:
        """(a) of every student layer."""
        student = context.student_outputs["layers"]
        teacher = context.teacher_detections
        num_s, num_t = student["pred_logits"].shape[0], teacher["pred_logits"].shape[0]
        losses = {}
        for layer in range(num_s):
            t_out = _layer_outputs(teacher, teacher_layer(layer, num_s, num_t, self.layer_by_layer))
            s_out = _layer_outputs(student, layer)
            targets, kept = self._targets(t_out)
            matched = self.matcher({k: v.detach() for k, v in s_out.items()}, targets)
            pairs = [(s, keep[t]) for (s, t), keep in zip(matched, kept)]
            sums = matched_prediction_sums(s_out, t_out, pairs, self.softmax)
            norm = global_count(sums[3], s_out["pred_logits"].device)
            suffix = _suffix(layer, num_s)
            for name, weight, value in zip(("cls", "l1", "giou"), self.weights, sums[:3]):
                losses[f"loss_kd_detrdistill_{name}{suffix}"] = weight * value / norm
        return losses

    @torch.no_grad()
    def feature_masks(self, context: KDContext, layer: int) -> torch.Tensor:
        """(b)'s (B, S) mask of teacher layer ``layer`` (0 on padding tokens)."""
        det = context.teacher_detections
        memory = context.encoder_memory("teacher")
        feats = F.normalize(memory["memory"].float(), dim=-1)  # (B, S, d_t)
        valid = ~memory["padding_mask"]
        scores_all = foreground_scores(det["pred_logits"][layer].float(), self.softmax)
        masks = []
        for b in range(feats.shape[0]):
            scores = scores_all[b]  # (N, C)
            k = min(self.topk, scores.numel())
            values, flat = scores.flatten().topk(k)
            query = flat // scores.shape[1]
            gt = context.targets[b]["boxes"].to(values.device).float()
            if len(gt):
                boxes = box_cxcywh_to_xyxy(det["pred_boxes"][layer, b, query].float())
                values = values * box_iou(boxes, box_cxcywh_to_xyxy(gt))[0].amax(-1)
            hidden = F.normalize(det["hidden_states"][layer, b, query].float(), dim=-1)
            mask = (feats[b] @ hidden.T @ values).clamp(min=1e-2) * valid[b]
            masks.append(mask / mask.amax().clamp(min=1e-12))
        return torch.stack(masks)

    def masked_feature_loss(self, context: KDContext, mask: torch.Tensor) -> torch.Tensor:
        """sum (m (F_t - A(F_s)))^2 / (n_tokens d_t) over the tokens that are not padding."""
        return masked_memory_loss(context, mask, self.adapter)

    def feature_losses(self, context: KDContext) -> Dict[str, torch.Tensor]:
        """(b) of every teacher layer."""
        num_t = context.teacher_detections["pred_logits"].shape[0]
        losses = {}
        for layer in range(num_t):
            value = self.masked_feature_loss(context, self.feature_masks(context, layer))
            losses[f"loss_kd_detrdistill_feature{_suffix(layer, num_t)}"] = (
                self.feature_weight * value
            )
        return losses

    def assignment_losses(self, context: KDContext) -> Dict[str, torch.Tensor]:
        """(c) of every student layer of the "specific" group."""
        group = next((p for p in context.pairs if p.name == "specific"), None)
        if group is None:
            raise RuntimeError(
                "DETRDistillLoss (QUERY_PRIOR) needs the 'specific' point group (the student's "
                "outputs on the teacher's queries): MODEL.KD.POINTS consistent with "
                "MODEL.KD.SPECIFIC.ENABLED True"
            )
        criterion, t_matcher = self._models
        student, teacher = group.student, context.teacher_detections
        num_s, num_t = student["pred_logits"].shape[0], teacher["pred_logits"].shape[0]
        targets = context.targets
        num_boxes = criterion.get_num_boxes(targets, student["pred_logits"].device)
        losses = {}
        for layer in range(num_s):
            t_out = _layer_outputs(teacher, teacher_layer(layer, num_s, num_t, self.layer_by_layer))
            assignment = t_matcher(t_out, targets)
            outputs = {k: v.float() for k, v in _layer_outputs(student, layer).items()}
            values = criterion.layer_losses(outputs, targets, assignment, num_boxes)
            for key, value in values.items():
                name = key[len("loss_") :]
                weight = self.assign_weight * criterion.weight_dict.get(key, 1.0)
                losses[f"loss_kd_detrdistill_assign_{name}{_suffix(layer, num_s)}"] = (
                    weight * value
                )
        return losses

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        with full_precision(context):
            losses = self.logit_losses(context)
            if self.feature_weight:
                losses.update(self.feature_losses(context))
            if self.query_prior:
                losses.update(self.assignment_losses(context))
        return losses

    def extra_repr(self):
        return (
            f"weights={self.weights}, softmax={self.softmax}, layer_by_layer="
            f"{self.layer_by_layer}, feature_weight={self.feature_weight}, topk={self.topk}, "
            f"query_prior={self.query_prior}, score_threshold={self.score_threshold}"
        )


def masked_memory_loss(
    context: KDContext, mask: torch.Tensor, adapter: Optional[nn.Module]
) -> torch.Tensor:
    """sum_{b, s, c} (m_bs (F_t - A(F_s))_bsc)^2 / (n d_t), n the tokens that are not padding in
    the teacher's mask (summed over ranks / world size); A the adapter (None: identity).

    Raises:
        ValueError: the models' encoders have different token grids.
    """
    s, t = context.encoder_memory("student"), context.encoder_memory("teacher")
    if s["spatial_shapes"] != t["spatial_shapes"]:
        raise ValueError(
            f"feature distillation on the encoder memory needs the same token grid in both "
            f"models; student {s['spatial_shapes']}, teacher {t['spatial_shapes']}"
        )
    student = s["memory"].float()
    if adapter is not None:
        student = adapter(student)
    valid = ~t["padding_mask"]
    diff = (t["memory"].detach().float() - student) * mask[..., None]
    squared = (diff**2 * valid[..., None]).sum()
    norm = global_count(valid.sum().item(), student.device) * student.shape[-1]
    return squared / norm
