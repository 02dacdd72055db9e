# Copyright (c) kd_detr contributors.
"""Box-distribution distillation from a teacher: D-FINE's decoupled distillation focal (DDF)
loss (Peng et al., ICLR 2025, GO-LSD) between the teacher's final-layer edge distributions and
every student layer's, at KD-DETR's paired points.

Models with fine-grained distribution refinement (D-FINE) predict each box edge as a
distribution over R + 1 bins ("pred_corners"), measured from the query's coarse "initial_boxes".
GO-LSD distils the final layer's distributions into the earlier layers of the same model; this
term distils a teacher's into a student's, per point group g and student layer l:

1. Frame alignment: the teacher's distances are measured from its own initial box, the
   student's from a different one (and bins may differ: other R, reg_scale, up). Each teacher
   bin n (probability p_n, at temperature T) is an absolute edge position; it is re-expressed in
   the student's units from the student's initial box and its mass split between the two
   student bins around it, in proportion to the distances (linear interpolation, which keeps
   the expected edge; positions outside the student's range go to its end bins). With the same
   initial boxes and bins this is the identity, so the term is then D-FINE's DDF exactly.
2. KL_i,e = T^2 sum_n q_n log(q_n / s_n) per point i and edge e, q the aligned teacher
   distribution, s = softmax(student logits / T).
3. Weights (D-FINE's): a point matched to a ground-truth object (``MODEL.KD.DDF.MATCHING``
   "teacher": the teacher's final predictions at the group Hungarian-matched to the ground truth
   with the teacher's matcher) weighs the IoU of the student layer's box with that object
   (detached); an unmatched point weighs the teacher's confidence, which is KD-DETR's foreground
   weight of the point when the pairing gives one (the teacher's highest foreground probability,
   the same quantity) and else its highest class probability.
4. Matched and unmatched edges are averaged separately and mixed with weights sqrt(count / B):
   ``(mean_pos sqrt(N_pos / B) + mean_neg sqrt(N_neg / B)) / (sqrt(N_pos / B) + sqrt(N_neg / B))``
   (per rank, as D-FINE), times ``MODEL.KD.DDF.WEIGHT``.

Keys: ``loss_kd_ddf_<group>`` (last student layer) and ``loss_kd_ddf_<group>_<l>``.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import CONFIG_EXTENSION_REGISTRY
from ..modeling.box_ops import box_cxcywh_to_xyxy, paired_box_iou
from .registry import KD_LOSS_REGISTRY
from .term import PointKDTerm
from .weights import foreground_weights

__all__ = [
    "DDF_MATCHING",
    "DistributionKDLoss",
    "add_distribution_kd_config",
    "align_edge_distributions",
    "decoupled_distillation_focal_loss",
]

DDF_MATCHING = ("teacher", "none")
_DISTRIBUTION_KEYS = ("pred_corners", "initial_boxes", "corner_offsets")


@CONFIG_EXTENSION_REGISTRY.register(name="distill_ddf")
def add_distribution_kd_config(cfg):
    """Add ``MODEL.KD.DDF`` (the ``DistributionKDLoss`` term)."""
    cfg.MODEL.KD.DDF = CN()
    # Weight and temperature of the distribution KL (D-FINE's loss_ddf: 1.5 and T = 5).
    cfg.MODEL.KD.DDF.WEIGHT = 1.5
    cfg.MODEL.KD.DDF.TEMPERATURE = 5.0
    # Which points count as matched (weight: the student box's IoU with the object): "teacher"
    # (the teacher's final predictions at each point group Hungarian-matched to the ground
    # truth) or "none" (every point weighs the teacher's confidence).
    cfg.MODEL.KD.DDF.MATCHING = "teacher"


def _edge_frames(boxes: torch.Tensor):
    """(centre, size, sign) of the (left, top, right, bottom) edges of (..., 4) cxcywh boxes:
    centre and size (..., 4), sign (4,) (-1 left / top, +1 right / bottom)."""
    cx, cy, w, h = boxes.unbind(-1)
    centre = torch.stack([cx, cy, cx, cy], -1)
    size = torch.stack([w, h, w, h], -1)
    sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
    return centre, size, sign


def align_edge_distributions(
    prob: torch.Tensor,
    src_boxes: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_boxes: torch.Tensor,
    dst_offsets: torch.Tensor,
) -> torch.Tensor:
    """Edge distributions over one model's bins and initial boxes re-expressed over another's.

    Bin n of an edge of box (c, s) (centre and size along the edge's axis) stands for the edge
    at ``c + sign * offsets[n] * s``; that position, seen from the destination box, lies at
    ``u = sign * (edge - c') / s'`` between two destination bins, which share its probability
    linearly (outside the destination range: all on the end bin).

    Args:
        prob (Tensor): (..., 4, R_src + 1) probabilities of the (left, top, right, bottom) edges.
        src_boxes, dst_boxes (Tensor): (..., 4) cxcywh boxes the distances are measured from.
        src_offsets (Tensor): (R_src + 1,) increasing bin values (the model's ``corner_offsets``).
        dst_offsets (Tensor): (R_dst + 1,) increasing bin values of the destination.

    Returns:
        Tensor: (..., 4, R_dst + 1) probabilities (each row sums to the source row's sum).
    """
    src_c, src_s, sign = _edge_frames(src_boxes.to(prob.dtype))
    dst_c, dst_s, _ = _edge_frames(dst_boxes.to(prob.dtype))
    edge = src_c[..., None] + sign[:, None] * src_offsets.to(prob)[None] * src_s[..., None]
    grid = dst_offsets.to(prob).contiguous()
    u = sign[:, None] * (edge - dst_c[..., None]) / dst_s[..., None].clamp(min=1e-12)
    u = torch.minimum(torch.maximum(u, grid[0]), grid[-1])
    left = (torch.searchsorted(grid, u.contiguous(), right=True) - 1).clamp(0, len(grid) - 2)
    w_right = ((u - grid[left]) / (grid[left + 1] - grid[left])).clamp(0, 1)
    out = prob.new_zeros(prob.shape[:-1] + (len(grid),))
    out.scatter_add_(-1, left, prob * (1 - w_right))
    out.scatter_add_(-1, left + 1, prob * w_right)
    return out


def decoupled_distillation_focal_loss(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    matched: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """D-FINE's DDF loss of one student layer against aligned teacher distributions.

    Args:
        student_logits (Tensor): (B, M, 4 (R + 1)) edge-distribution logits.
        target (Tensor): (B, M, 4, R + 1) teacher probabilities at temperature T (detached).
        weight (Tensor): (B, M) per-point weights (detached).
        matched (Tensor): (B, M) bool, points matched to an object.
        temperature (float): T.

    Returns:
        Tensor: scalar (0 with the student in the graph when M = 0).
    """
    bsz = student_logits.shape[0]
    if target.numel() == 0:
        return student_logits.sum() * 0
    log_s = F.log_softmax(student_logits.reshape(target.shape) / temperature, dim=-1)
    target = target.detach()
    kl = (torch.special.xlogy(target, target) - target * log_s).sum(-1) * temperature**2
    kl = kl * weight.detach()[..., None]  # (B, M, 4)
    pos = matched[..., None].expand_as(kl)
    num_pos, num_neg = (pos.sum() / bsz) ** 0.5, ((~pos).sum() / bsz) ** 0.5
    loss_pos = kl[pos].mean() if pos.any() else kl.sum() * 0
    loss_neg = kl[~pos].mean() if (~pos).any() else kl.sum() * 0
    return (loss_pos * num_pos + loss_neg * num_neg) / (num_pos + num_neg)


@KD_LOSS_REGISTRY.register()
class DistributionKDLoss(PointKDTerm):
    """D-FINE's decoupled distillation focal loss from a teacher's box distributions, at every
    paired point group (``MODEL.KD.LOSSES [..., 'DistributionKDLoss']``, ``MODEL.KD.DDF.*``);
    see the module doc. Both models must predict box distributions ("pred_corners", e.g.
    D-FINE); combine with ``KDDETRLoss`` for KD-DETR's class and box terms. The student's own
    GO-LSD (``MODEL.DFINE.GO_LSD``) is a detection loss and stays on.

    Pair dicts (the "distributions" input, see :class:`~kd_detr.distill.context.PointPair`):
    student "pred_corners" (L, B, M, 4 (R_s + 1)), "pred_boxes" (L, B, M, 4), "initial_boxes",
    "corner_offsets"; teacher "pred_corners" (B, M, 4 (R_t + 1)), "pred_logits" (B, M, K),
    "initial_boxes", "corner_offsets", and optionally "matched" (B, M) bool with
    "matched_boxes" (B, M, 4) cxcywh, the object of each matched point (:meth:`forward` adds
    them with MATCHING "teacher"; absent: no point is matched).
    """

    inputs = frozenset({"points", "distributions", "targets"})

    @configurable
    def __init__(
        self, *, weight: float = 1.5, temperature: float = 5.0, matching: str = "teacher",
        softmax: bool = False,
    ):  # fmt: skip
        """
        Args:
            weight (float): multiplier of every key (D-FINE's loss_ddf weight 1.5).
            temperature (float): T (D-FINE: 5).
            matching (str): one of :data:`DDF_MATCHING`.
            softmax (bool): softmax classifiers (the confidence without point weights).
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"MODEL.KD.DDF.TEMPERATURE must be > 0, got {temperature}")
        if matching not in DDF_MATCHING:
            raise ValueError(
                f"MODEL.KD.DDF.MATCHING must be one of {DDF_MATCHING}, got {matching!r}"
            )
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.matching = matching
        self.softmax = bool(softmax)
        self._matcher = ()  # (the teacher's matcher,) after bind(); a tuple: not a submodule

    @classmethod
    def from_config(cls, cfg):
        ddf = cfg.MODEL.KD.DDF
        detr = cfg.MODEL.get("DETR")
        softmax = detr is not None and not detr.USE_FOCAL_LOSS
        return {"weight": ddf.WEIGHT, "temperature": ddf.TEMPERATURE, "matching": ddf.MATCHING,
                "softmax": softmax}  # fmt: skip

    def bind(self, student, teacher) -> None:
        """Both models must predict box distributions ("pred_corners" and ``corner_offsets``);
        keeps the teacher's matcher for MATCHING "teacher"."""
        lacking = [
            f"the {role} ({type(model).__name__})"
            for role, model in (("student", student), ("teacher", teacher))
            if not callable(getattr(model, "corner_offsets", None))
        ]
        if lacking:
            raise ValueError(
                f"DistributionKDLoss (MODEL.KD.LOSSES) distils box distributions "
                f"(\"pred_corners\") from the teacher ({type(teacher).__name__}) into the student "
                f"({type(student).__name__}), but {' and '.join(lacking)} predicts none: use "
                "models with distribution box heads (D-FINE, MODEL.META_ARCHITECTURE 'DFINE') "
                "for both, or remove 'DistributionKDLoss' from MODEL.KD.LOSSES"
            )
        self._matcher = (teacher.criterion.matcher,)

    def forward(self, context) -> Dict[str, torch.Tensor]:
        losses = {}
        for pair in context.pairs:
            teacher = pair.teacher
            if self.matching == "teacher":
                teacher = dict(teacher, **self._match(teacher, context.targets))
            losses.update(self.pair_losses(pair.student, teacher, pair.weights, pair.name))
        return losses

    @torch.no_grad()
    def _match(self, teacher: Dict, targets) -> Dict[str, torch.Tensor]:
        """"matched" (B, M) and "matched_boxes" (B, M, 4): the teacher's final predictions at
        the points Hungarian-matched to the ground truth (student classes)."""
        if not self._matcher:
            raise RuntimeError("DistributionKDLoss: call bind(student, teacher) before use")
        logits, boxes = teacher["pred_logits"].detach(), teacher["pred_boxes"].detach()
        matched = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
        matched_boxes = torch.zeros_like(boxes)
        if boxes.shape[1] == 0:
            return {"matched": matched, "matched_boxes": matched_boxes}
        indices = self._matcher[0]({"pred_logits": logits, "pred_boxes": boxes}, targets)
        for b, ((query, obj), target) in enumerate(zip(indices, targets)):
            query = query.to(boxes.device)
            matched[b, query] = True
            matched_boxes[b, query] = target["boxes"][obj.to(target["boxes"].device)].to(boxes)
        return {"matched": matched, "matched_boxes": matched_boxes}

    def pair_losses(
        self, student: Dict, teacher: Dict, weights: Optional[torch.Tensor], group: str
    ) -> Dict[str, torch.Tensor]:
        for role, d in (("student", student), ("teacher", teacher)):
            missing = [k for k in _DISTRIBUTION_KEYS if k not in d]
            if missing:
                raise ValueError(
                    f"DistributionKDLoss, group '{group}': the {role}'s pair has no {missing} "
                    "(box distributions): the term needs the 'distributions' KD input and "
                    "models predicting \"pred_corners\" (D-FINE)"
                )
        s_corners = student["pred_corners"].float()
        s_corners = s_corners[None] if s_corners.dim() == 3 else s_corners  # (L, B, M, .)
        s_boxes = student["pred_boxes"].float()
        s_boxes = s_boxes[None] if s_boxes.dim() == 3 else s_boxes
        t_corners = teacher["pred_corners"].detach().float()
        bsz, num = t_corners.shape[:2]
        t_bins, s_bins = len(teacher["corner_offsets"]), len(student["corner_offsets"])
        if t_corners.shape[-1] != 4 * t_bins or s_corners.shape[-1] != 4 * s_bins:
            raise ValueError(
                f"DistributionKDLoss, group '{group}': pred_corners (last dim teacher "
                f"{t_corners.shape[-1]}, student {s_corners.shape[-1]}) must be 4 x the number "
                f"of bins (teacher {t_bins}, student {s_bins})"
            )
        with torch.no_grad():
            t_prob = F.softmax(t_corners.reshape(bsz, num, 4, t_bins) / self.temperature, -1)
            target = align_edge_distributions(
                t_prob, teacher["initial_boxes"].detach().float(),
                teacher["corner_offsets"].detach().float(),
                student["initial_boxes"].detach().float(),
                student["corner_offsets"].detach().float(),
            )  # fmt: skip
            if weights is None:
                conf = foreground_weights(teacher["pred_logits"], self.softmax)
            else:
                conf = weights.detach().float()
            matched = teacher.get("matched")
            if matched is None:
                matched = torch.zeros((bsz, num), dtype=torch.bool, device=t_corners.device)
        num_layers = s_corners.shape[0]
        losses = {}
        for layer in range(num_layers):
            weight = conf
            if matched.any():
                with torch.no_grad():
                    iou = paired_box_iou(box_cxcywh_to_xyxy(s_boxes[layer].detach()),
                                         box_cxcywh_to_xyxy(teacher["matched_boxes"].float()))
                weight = torch.where(matched, iou, conf)
            value = decoupled_distillation_focal_loss(
                s_corners[layer], target, weight, matched, self.temperature
            )
            suffix = group if layer == num_layers - 1 else f"{group}_{layer}"
            losses[f"loss_kd_ddf_{suffix}"] = self.weight * value
        return losses

    def extra_repr(self):
        return (
            f"weight={self.weight}, temperature={self.temperature}, "
            f"matching={self.matching!r}, softmax={self.softmax}"
        )
