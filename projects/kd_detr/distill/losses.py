# Copyright (c) kd_detr contributors.
"""KD-DETR's distillation losses (Wang et al., CVPR 2024): class KL with temperature, box L1
and GIoU at the distillation points, every student decoder layer against the teacher's final
layer, each point weighted by the teacher's foreground probability.

Notation for one group and one student layer: i over the B * M points, w_i the point weights,
T the temperature, K the number of logits, W = sum_i w_i, z logits, b cxcywh boxes.

* ``official`` (the official ``KDCriterion`` exactly):
  cls = sum_i w_i T^2 (1/K) sum_c p_t log(p_t / p_s), p = softmax(z / T);
  l1 = sum_i w_i mean_4 |b_s - b_t| / W; giou = sum_i w_i (1 - GIoU(b_s, b_t)) / W,
  with W the local (per-rank) sum. Known quirks kept on purpose: the class term is not
  normalised (it grows with batch size, Mg and the number of ranks, unlike the box terms), it
  averages instead of sums over classes, and it applies a softmax to the logits of a sigmoid
  (focal) classifier.
* ``normalized``: cls = sum_i w_i T^2 sum_c p_t log(p_t / p_s) / W, box terms as above, and W the
  sum over all ranks divided by the world size; averaging the ranks' losses (as DDP averages
  gradients) then equals one rank holding all points.
* ``sigmoid`` (sigmoid/focal classifiers): per class, the KL between the Bernoulli
  distributions q = sigmoid(z / T): cls = sum_i w_i T^2 sum_c [q_t log(q_t / q_s) +
  (1 - q_t) log((1 - q_t) / (1 - q_s))] / W, normalised like ``normalized``.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.utils import comm

from ..modeling.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from ..modeling.num_classes import num_classes
from .base_classes import base_class_indices, config_base_classes
from .registry import KD_LOSS_REGISTRY
from .term import PointKDTerm

__all__ = [
    "KD_MODES",
    "KDDETRLoss",
    "all_reduce_sum",
    "final_layer_targets",
    "kd_detr_losses",
    "sigmoid_kl",
    "softmax_kl",
]

KD_MODES = ("official", "normalized", "sigmoid")
_EPS = 1e-12  # keeps 0 / 0 at 0 when no point has weight (e.g. M = 0)


def softmax_kl(student_logits, teacher_logits, temperature: float):
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over the last dim.

    Args:
        student_logits (Tensor): (..., K).
        teacher_logits (Tensor): (..., K).
        temperature (float): T.

    Returns:
        Tensor: (...,) per-point divergence.
    """
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2


def sigmoid_kl(student_logits, teacher_logits, temperature: float):
    """T^2 * sum_c KL(Bernoulli(q_t) || Bernoulli(q_s)), q = sigmoid(z / T).

    Args:
        student_logits (Tensor): (..., C).
        teacher_logits (Tensor): (..., C).
        temperature (float): T.

    Returns:
        Tensor: (...,) per-point divergence.
    """
    zs, zt = student_logits / temperature, teacher_logits / temperature
    q_t = zt.sigmoid()
    pos = q_t * (F.logsigmoid(zt) - F.logsigmoid(zs))
    neg = (1 - q_t) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
    return (pos + neg).sum(-1) * temperature**2


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a copy; the input itself on a single process)."""
    if comm.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def final_layer_targets(group_outputs: Dict) -> Dict[str, torch.Tensor]:
    """The teacher's targets of a group: its final layer, detached.

    Args:
        group_outputs (dict): "pred_logits" (L, B, M, K) and "pred_boxes" (L, B, M, 4), e.g. a
            teacher ``outputs["groups"][g]`` or ``outputs["layers"]``; "hidden_states" is kept
            when present.

    Returns:
        dict: the same keys with the last layer, (B, M, .), detached.
    """
    keys = [k for k in ("pred_logits", "pred_boxes", "hidden_states") if k in group_outputs]
    return {k: group_outputs[k][-1].detach() for k in keys}


def _with_layers(tensor):
    return tensor[None] if tensor.dim() == 3 else tensor


def kd_detr_losses(
    student: Dict,
    teacher: Dict,
    weights: Optional[torch.Tensor],
    group: str,
    *,
    mode: str = "official",
    temperature: float = 10.0,
    cls_weight: float = 1.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    classes: Optional[Sequence[int]] = None,
) -> Dict[str, torch.Tensor]:
    """Weighted KD-DETR losses of one point group, every student layer (see the module doc).

    Args:
        student (dict): "pred_logits" (L, B, M, K), "pred_boxes" (L, B, M, 4) ((B, M, .): L = 1).
        teacher (dict): "pred_logits" (B, M, K), "pred_boxes" (B, M, 4), final layer (detached
            here again).
        weights (Tensor or None): (B, M) point weights (detached here); None: ones.
        group (str): group name in the keys.
        mode (str): one of :data:`KD_MODES`.
        temperature (float): T.
        cls_weight, l1_weight, giou_weight (float): multipliers of the three terms.
        classes (list[int] or None): logit indices the class term compares (Incremental-DETR's
            base classes, plus background for softmax; K is then their count); None: all.

    Returns:
        dict: ``loss_kd_{cls,bbox,giou}_<group>`` (last student layer) and ``..._<group>_<l>``
        (layer l < L - 1), float32 scalars already multiplied by their weights.
    """
    if mode not in KD_MODES:
        raise ValueError(f"unknown KD mode {mode!r}; expected one of {KD_MODES} (MODEL.KD.MODE)")
    s_logits = _with_layers(student["pred_logits"]).float()
    s_boxes = _with_layers(student["pred_boxes"]).float()
    t_logits = teacher["pred_logits"].detach().float()
    t_boxes = teacher["pred_boxes"].detach().float()
    if s_logits.shape[1:] != t_logits.shape or s_boxes.shape[1:] != t_boxes.shape:
        raise ValueError(
            f"KD group '{group}': student (L, B, M, K) = {tuple(s_logits.shape)} / boxes "
            f"{tuple(s_boxes.shape)} do not match teacher (B, M, K) = {tuple(t_logits.shape)} / "
            f"{tuple(t_boxes.shape)}; different class counts need MODEL.KD.CLASS_MAPPING and "
            "the same classifier type (sigmoid or softmax)"
        )
    if classes is not None:  # the class term on these logits only (weights are unchanged)
        index = torch.as_tensor(list(classes), dtype=torch.long, device=t_logits.device)
        s_logits, t_logits = s_logits.index_select(-1, index), t_logits.index_select(-1, index)
    if weights is None:
        weights = t_logits.new_ones(t_logits.shape[:-1])
    weights = weights.detach().float()
    if weights.shape != t_logits.shape[:-1]:
        raise ValueError(
            f"KD group '{group}': weights must be (B, M) = {tuple(t_logits.shape[:-1])}, "
            f"got {tuple(weights.shape)}"
        )
    if mode == "official":
        norm = weights.sum().clamp(min=_EPS)
    else:  # global normaliser: sum over ranks / world size (DDP averages the ranks' gradients)
        norm = (all_reduce_sum(weights.sum()) / comm.get_world_size()).clamp(min=_EPS)
    t_xyxy = box_cxcywh_to_xyxy(t_boxes).reshape(-1, 4)
    num_layers = s_logits.shape[0]
    losses = {}
    for layer in range(num_layers):
        if mode == "sigmoid":
            cls = (weights * sigmoid_kl(s_logits[layer], t_logits, temperature)).sum() / norm
        elif mode == "normalized":
            cls = (weights * softmax_kl(s_logits[layer], t_logits, temperature)).sum() / norm
        else:  # official: averaged over the K logits, summed (not normalised) over points
            kl = softmax_kl(s_logits[layer], t_logits, temperature) / t_logits.shape[-1]
            cls = (weights * kl).sum()
        l1 = (weights * (s_boxes[layer] - t_boxes).abs().mean(-1)).sum() / norm
        s_xyxy = box_cxcywh_to_xyxy(s_boxes[layer]).reshape(-1, 4)
        giou = 1 - paired_generalized_box_iou(s_xyxy, t_xyxy).view_as(weights)
        giou = (weights * giou).sum() / norm
        suffix = group if layer == num_layers - 1 else f"{group}_{layer}"
        losses[f"loss_kd_cls_{suffix}"] = cls_weight * cls
        losses[f"loss_kd_bbox_{suffix}"] = l1_weight * l1
        losses[f"loss_kd_giou_{suffix}"] = giou_weight * giou
    return losses


@KD_LOSS_REGISTRY.register()
class KDDETRLoss(PointKDTerm):
    """KD-DETR's class KL + box L1 + GIoU term (:func:`kd_detr_losses`) as a registry plug-in,
    on every paired point group.

    Follows the ``KD_LOSS_REGISTRY`` call contract; config: ``MODEL.KD.{MODE, TEMPERATURE,
    CLS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT}``.
    """

    @configurable
    def __init__(
        self,
        *,
        mode: str = "official",
        temperature: float = 10.0,
        cls_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        base_classes: Sequence[int] = (),
        num_classes: Optional[int] = None,
    ):
        super().__init__()
        self.base_classes = [int(c) for c in base_classes]
        self.num_classes = num_classes
        if self.base_classes and num_classes is None:
            raise ValueError("MODEL.KD.BASE_CLASSES needs the student's class count")
        if mode not in KD_MODES:
            raise ValueError(
                f"unknown KD mode {mode!r}; expected one of {KD_MODES} (MODEL.KD.MODE)"
            )
        if temperature <= 0:
            raise ValueError(f"MODEL.KD.TEMPERATURE must be > 0, got {temperature}")
        self.mode = mode
        self.temperature = float(temperature)
        self.cls_weight = float(cls_weight)
        self.l1_weight = float(l1_weight)
        self.giou_weight = float(giou_weight)

    @classmethod
    def from_config(cls, cfg):
        kd = cfg.MODEL.KD
        detr = cfg.MODEL.get("DETR")
        if kd.MODE == "sigmoid" and detr is not None and not detr.USE_FOCAL_LOSS:
            raise ValueError(
                "MODEL.KD.MODE 'sigmoid' needs sigmoid (focal) class logits, but "
                "MODEL.DETR.USE_FOCAL_LOSS is False: use 'official' or 'normalized'"
            )
        return {
            "mode": kd.MODE,
            "temperature": kd.TEMPERATURE,
            "cls_weight": kd.CLS_WEIGHT,
            "l1_weight": kd.L1_WEIGHT,
            "giou_weight": kd.GIOU_WEIGHT,
            "base_classes": config_base_classes(cfg),
            "num_classes": num_classes(cfg),
        }

    def pair_losses(self, student, teacher, weights, group: str) -> Dict[str, torch.Tensor]:
        """See ``KD_LOSS_REGISTRY``'s call contract and :func:`kd_detr_losses`."""
        return kd_detr_losses(
            student,
            teacher,
            weights,
            group,
            mode=self.mode,
            temperature=self.temperature,
            cls_weight=self.cls_weight,
            l1_weight=self.l1_weight,
            giou_weight=self.giou_weight,
            classes=self._classes(teacher["pred_logits"].shape[-1]),
        )

    def _classes(self, num_logits: int):
        """Logit indices of the class term (MODEL.KD.BASE_CLASSES), None for all."""
        if not self.base_classes:
            return None
        return base_class_indices(self.base_classes, num_logits, self.num_classes)

    def extra_repr(self):
        base = f", base_classes={self.base_classes}" if self.base_classes else ""
        return (
            f"mode={self.mode!r}, temperature={self.temperature}, weights=("
            f"{self.cls_weight}, {self.l1_weight}, {self.giou_weight}){base}"
        )
