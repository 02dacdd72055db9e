# Copyright (c) kd_detr contributors.
"""DKD, decoupled knowledge distillation (Zhao et al., CVPR 2022), on paired point groups.

Per point with target class t (the teacher's arg-max at general / specific points, which have no
ground truth; the ground-truth class when the pairing provides ``teacher["gt_labels"]``):

* softmax models (K = C + 1 logits), p = softmax(z / T):
  TCKD = KL([p_t^T, 1 - p_t^T] || [p_t^S, 1 - p_t^S]) (target vs all non-target mass),
  NCKD = KL(p^T_{\\t} || p^S_{\\t}) with p_{\\t} = softmax over the non-target logits;
* sigmoid (focal) models (K = C), q = sigmoid(z / T), every class a binary distribution:
  TCKD = KL(Bern(q^T_t) || Bern(q^S_t)), NCKD = sum_{c != t} KL(Bern(q^T_c) || Bern(q^S_c)).

loss = T^2 (alpha TCKD + beta NCKD), averaged over points with the point weights w:
sum_i w_i loss_i / W, W the sum of weights over all ranks / world size (as KD-DETR's normalized
mode). Every student decoder layer is distilled against the teacher's final layer. Defaults are
the paper's ImageNet / COCO settings: alpha 1, beta 8 (COCO: beta 2 for Faster R-CNN), T 4.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.utils import comm

from ..config import CONFIG_EXTENSION_REGISTRY
from .losses import all_reduce_sum
from .registry import KD_LOSS_REGISTRY
from .term import PointKDTerm

__all__ = ["DKDLoss", "add_dkd_config", "dkd_point_losses"]

_EPS = 1e-12
# Subtracted from the target logit (over T): its probability vanishes while logs stay finite.
_MASK = 1000.0


@CONFIG_EXTENSION_REGISTRY.register(name="distill_dkd")
def add_dkd_config(cfg):
    """Add ``MODEL.KD.DKD`` (the ``DKDLoss`` term)."""
    cfg.MODEL.KD.DKD = CN()
    # Weights of the target-class (TCKD) and non-target-class (NCKD) terms (DKD: 1.0 / 8.0).
    cfg.MODEL.KD.DKD.ALPHA = 1.0
    cfg.MODEL.KD.DKD.BETA = 8.0
    # Temperature T of both terms (DKD: 4.0); the loss is multiplied by T^2.
    cfg.MODEL.KD.DKD.TEMPERATURE = 4.0


def dkd_point_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-point TCKD and NCKD (without T^2), see the module doc.

    Args:
        student_logits, teacher_logits (Tensor): (..., K).
        target (Tensor): (...,) int64 target class per point, in [0, K).
        temperature (float): T.
        softmax (bool): softmax logits (else sigmoid).

    Returns:
        tuple[Tensor, Tensor]: TCKD (...,) and NCKD (...,).
    """
    zs, zt = student_logits / temperature, teacher_logits.detach() / temperature
    is_target = F.one_hot(target, zs.shape[-1]).to(zs.dtype)
    if not softmax:
        q_t = zt.sigmoid()
        kl = q_t * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - q_t) * (
            F.logsigmoid(-zt) - F.logsigmoid(-zs)
        )
        return (kl * is_target).sum(-1), (kl * (1 - is_target)).sum(-1)
    p_s, p_t = zs.softmax(-1), zt.softmax(-1)
    s_target = (p_s * is_target).sum(-1)
    t_target = (p_t * is_target).sum(-1)
    b_s = torch.stack([s_target, 1 - s_target], -1).clamp(min=_EPS)
    b_t = torch.stack([t_target, 1 - t_target], -1).clamp(min=_EPS)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)
    log_s = F.log_softmax(zs - _MASK * is_target, -1)
    log_t = F.log_softmax(zt - _MASK * is_target, -1)
    nckd = (log_t.exp() * (log_t - log_s)).sum(-1)
    return tckd, nckd


@KD_LOSS_REGISTRY.register()
class DKDLoss(PointKDTerm):
    """DKD at every paired point group (``MODEL.KD.LOSSES ['DKDLoss']``, ``MODEL.KD.DKD.*``);
    keys ``loss_kd_dkd_<group>[_<layer>]``. The class type (softmax / sigmoid) is the student's
    (``MODEL.DETR.USE_FOCAL_LOSS``)."""

    @configurable
    def __init__(
        self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        softmax: bool = True,
    ):  # fmt: skip
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"MODEL.KD.DKD.TEMPERATURE must be > 0, got {temperature}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = float(temperature)
        self.softmax = bool(softmax)

    @classmethod
    def from_config(cls, cfg):
        dkd = cfg.MODEL.KD.DKD
        detr = cfg.MODEL.get("DETR")
        softmax = detr is None or not detr.USE_FOCAL_LOSS
        return {"alpha": dkd.ALPHA, "beta": dkd.BETA, "temperature": dkd.TEMPERATURE,
                "softmax": softmax}  # fmt: skip

    def pair_losses(
        self, student: Dict, teacher: Dict, weights: Optional[torch.Tensor], group: str
    ) -> Dict[str, torch.Tensor]:
        s_logits = student["pred_logits"].float()
        s_logits = s_logits[None] if s_logits.dim() == 3 else s_logits  # (L, B, M, K)
        t_logits = teacher["pred_logits"].detach().float()  # (B, M, K)
        target = t_logits.argmax(-1)
        labels = teacher.get("gt_labels")  # similar-* pairings: ground truth, -1 on background
        if labels is not None:
            target = torch.where(labels >= 0, labels.to(target.device), target)
        if weights is None:
            weights = t_logits.new_ones(t_logits.shape[:-1])
        weights = weights.detach().float()
        norm = (all_reduce_sum(weights.sum()) / comm.get_world_size()).clamp(min=_EPS)
        scale = self.temperature**2
        losses = {}
        for layer in range(s_logits.shape[0]):
            tckd, nckd = dkd_point_losses(
                s_logits[layer], t_logits, target, self.temperature, self.softmax
            )
            value = scale * (weights * (self.alpha * tckd + self.beta * nckd)).sum() / norm
            suffix = group if layer == s_logits.shape[0] - 1 else f"{group}_{layer}"
            losses[f"loss_kd_dkd_{suffix}"] = value
        return losses

    def extra_repr(self):
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"softmax={self.softmax}"
        )
