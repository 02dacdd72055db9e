# Copyright (c) kd_detr contributors.
"""MLKD, multi-level logit distillation (Jin et al., CVPR 2023), on paired point groups.

The "batch" of the paper is, here, the N = B * M points of one point group flattened over its B
images (each point a sample). Per student decoder layer (each against the teacher's final
layer) and per temperature tau in TEMPERATURES (the paper's prediction augmentation, summed):

* P^S, P^T (N, K): softmax(z / tau) over the K = C + 1 logits (softmax models), or
  sigmoid(z / tau) per class (sigmoid / focal models, K = C: every class a binary prediction;
  the same three levels are computed on these per-class probabilities).
* Confidence mask m (N,): the teacher's confidence c_i at tau = 1 is its highest foreground
  probability (softmax: max over the first C softmax entries; sigmoid: max_c sigmoid); points
  with c_i below the MASK_QUANTILE quantile q of the group's N confidences (paper: the median,
  0.5) are masked out (m_i = 0); MASK_QUANTILE 0 keeps every point. n = sum m. MASK_KEEP
  "unconfident" keeps c_i <= q instead: the comparison of the official code (``confidence.le(
  median)``), which there multiplies the mask onto batch-mean scalars, so which samples it
  selects has no effect (it scales the loss by the kept fraction, ~0.5); the paper describes
  masking unreliable (low-confidence) teacher predictions, which "confident" (the default)
  implements. Checked against the official KD_ours.py.
* Instance level: sum_i m_i w_i KL_i tau^2 / W, KL_i = KL(P^T_i || P^S_i) (sigmoid: the sum of
  per-class Bernoulli KLs), w the point weights and W the sum of m w over all ranks / world size.
* Class level (class correlation): G = P^T diag(m) P / n (K x K), loss ||G^T - G^S||_F^2 / K.
* Batch level (sample correlation): G = P_m P_m^T (n x n, P_m the kept rows), loss
  ||G^T - G^S||_F^2 / n.

loss = INSTANCE_WEIGHT * instance + CLASS_WEIGHT * class + BATCH_WEIGHT * batch, summed over
the temperatures. Deviations from the paper's code, on purpose: the class Gram is averaged over the
kept points (the paper sums over a batch of 64 to 512 images; a group has B x 300 points, which
would scale the term by n^2); the mask removes points before the reductions (the official code
multiplies it onto already-reduced scalars); no strong-augmentation view (the pairing gives one
view); the Grams are per rank (no all-gather). Defaults: TEMPERATURES {1, 2, 3, 5, 6} (the ImageNet
config: T 1 plus the fixed 2, 3, 5, 6), weights 1. Cost: the batch level builds n x n Grams per
layer and temperature (n ~ B x M / 2 with the median mask; B 8, M 300: 1,200^2 entries).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.utils import comm

from ..config import CONFIG_EXTENSION_REGISTRY
from .losses import all_reduce_sum
from .registry import KD_LOSS_REGISTRY
from .term import PointKDTerm

__all__ = ["MLKDLoss", "add_mlkd_config", "mlkd_confidence_mask", "mlkd_levels"]

_EPS = 1e-12


@CONFIG_EXTENSION_REGISTRY.register(name="distill_mlkd")
def add_mlkd_config(cfg):
    """Add ``MODEL.KD.MLKD`` (the ``MLKDLoss`` term)."""
    cfg.MODEL.KD.MLKD = CN()
    # Prediction augmentation: every level at each temperature, summed (MLKD ImageNet: T 1 plus
    # the fixed 2, 3, 5, 6; CIFAR uses T 4 in place of 1).
    cfg.MODEL.KD.MLKD.TEMPERATURES = [1.0, 2.0, 3.0, 5.0, 6.0]
    # Weights of the instance, class-correlation and batch-correlation levels (MLKD: 1 each).
    cfg.MODEL.KD.MLKD.INSTANCE_WEIGHT = 1.0
    cfg.MODEL.KD.MLKD.CLASS_WEIGHT = 1.0
    cfg.MODEL.KD.MLKD.BATCH_WEIGHT = 1.0
    # Points whose teacher confidence is below this quantile of the group's are masked (MLKD:
    # the median, 0.5); 0 keeps every point.
    cfg.MODEL.KD.MLKD.MASK_QUANTILE = 0.5
    # Which side of that quantile is kept: "confident" (c >= q; the paper: unreliable teacher
    # predictions are masked) or "unconfident" (c <= q; the comparison of the official code).
    cfg.MODEL.KD.MLKD.MASK_KEEP = "confident"


def _probs(logits: torch.Tensor, tau: float, softmax: bool) -> torch.Tensor:
    return (logits / tau).softmax(-1) if softmax else (logits / tau).sigmoid()


MASK_KEEP = ("confident", "unconfident")


def mlkd_confidence_mask(
    teacher_logits: torch.Tensor, quantile: float, softmax: bool, keep: str = "confident"
):
    """(N,) float mask of the points kept (module doc) from the teacher's (N, K) logits: those
    at or above (``keep`` "confident") or at or below ("unconfident") the ``quantile``."""
    if softmax:
        confidence = teacher_logits.softmax(-1)[:, :-1].max(-1).values
    else:
        confidence = teacher_logits.sigmoid().max(-1).values
    if quantile <= 0 or confidence.numel() == 0:
        return torch.ones_like(confidence)
    threshold = torch.quantile(confidence, float(quantile))
    kept = confidence >= threshold if keep == "confident" else confidence <= threshold
    return kept.to(confidence.dtype)


def mlkd_levels(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float,
    mask: torch.Tensor,
    softmax: bool,
):
    """The three levels at one temperature for N points.

    Args:
        student_logits, teacher_logits (Tensor): (N, K).
        tau (float): temperature.
        mask (Tensor): (N,) 0 / 1.
        softmax (bool): softmax logits (else sigmoid).

    Returns:
        tuple: per-point instance KL times tau^2 (N,) (unmasked), the class-level loss and the
        batch-level loss (scalars, over the kept points).
    """
    zs, zt = student_logits / tau, teacher_logits.detach() / tau
    if softmax:
        log_t, log_s = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        q_t = zt.sigmoid()
        kl = (q_t * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - q_t) * (
            F.logsigmoid(-zt) - F.logsigmoid(-zs)
        )).sum(-1)  # fmt: skip
    instance = kl * tau**2
    p_s, p_t = _probs(student_logits, tau, softmax), _probs(teacher_logits.detach(), tau, softmax)
    keep = mask > 0
    p_s, p_t = p_s[keep], p_t[keep]
    n = p_s.shape[0]
    if n == 0:
        zero = student_logits.sum() * 0.0
        return instance, zero, zero
    k = p_s.shape[1]
    class_level = ((p_t.t() @ p_t - p_s.t() @ p_s) / n).pow(2).sum() / k
    batch_level = (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / n
    return instance, class_level, batch_level


@KD_LOSS_REGISTRY.register()
class MLKDLoss(PointKDTerm):
    """MLKD at every paired point group (``MODEL.KD.LOSSES ['MLKDLoss']``, ``MODEL.KD.MLKD.*``);
    keys ``loss_kd_mlkd_<group>[_<layer>]`` (the three levels summed). The class type (softmax /
    sigmoid) is the student's (``MODEL.DETR.USE_FOCAL_LOSS``)."""

    @configurable
    def __init__(
        self, *, temperatures: Sequence[float] = (1.0, 2.0, 3.0, 5.0, 6.0),
        instance_weight: float = 1.0, class_weight: float = 1.0, batch_weight: float = 1.0,
        mask_quantile: float = 0.5, softmax: bool = True, mask_keep: str = "confident",
    ):  # fmt: skip
        super().__init__()
        if not temperatures or min(temperatures) <= 0:
            raise ValueError(f"MODEL.KD.MLKD.TEMPERATURES must be > 0, got {temperatures}")
        if not 0 <= mask_quantile <= 1:
            raise ValueError(f"MODEL.KD.MLKD.MASK_QUANTILE must be in [0, 1], got {mask_quantile}")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.instance_weight = float(instance_weight)
        self.class_weight = float(class_weight)
        self.batch_weight = float(batch_weight)
        if mask_keep not in MASK_KEEP:
            raise ValueError(f"MODEL.KD.MLKD.MASK_KEEP must be one of {MASK_KEEP}, got "
                             f"{mask_keep!r}")  # fmt: skip
        self.mask_quantile = float(mask_quantile)
        self.mask_keep = mask_keep
        self.softmax = bool(softmax)

    @classmethod
    def from_config(cls, cfg):
        mlkd = cfg.MODEL.KD.MLKD
        detr = cfg.MODEL.get("DETR")
        softmax = detr is None or not detr.USE_FOCAL_LOSS
        return {
            "temperatures": list(mlkd.TEMPERATURES), "instance_weight": mlkd.INSTANCE_WEIGHT,
            "class_weight": mlkd.CLASS_WEIGHT, "batch_weight": mlkd.BATCH_WEIGHT,
            "mask_quantile": mlkd.MASK_QUANTILE, "softmax": softmax, "mask_keep": mlkd.MASK_KEEP,
        }  # fmt: skip

    def pair_losses(
        self, student: Dict, teacher: Dict, weights: Optional[torch.Tensor], group: str
    ) -> Dict[str, torch.Tensor]:
        s_logits = student["pred_logits"].float()
        s_logits = s_logits[None] if s_logits.dim() == 3 else s_logits  # (L, B, M, K)
        num_layers, k = s_logits.shape[0], s_logits.shape[-1]
        t_logits = teacher["pred_logits"].detach().float().reshape(-1, k)  # (N, K)
        s_logits = s_logits.reshape(num_layers, -1, k)
        if weights is None:
            weights = t_logits.new_ones(t_logits.shape[0])
        weights = weights.detach().float().reshape(-1)
        mask = mlkd_confidence_mask(t_logits, self.mask_quantile, self.softmax, self.mask_keep)
        weights = weights * mask
        norm = (all_reduce_sum(weights.sum()) / comm.get_world_size()).clamp(min=_EPS)
        losses = {}
        for layer in range(num_layers):
            value = s_logits.new_zeros(())
            for tau in self.temperatures:
                instance, class_level, batch_level = mlkd_levels(
                    s_logits[layer], t_logits, tau, mask, self.softmax
                )
                value = value + self.instance_weight * (weights * instance).sum() / norm
                value = value + self.class_weight * class_level + self.batch_weight * batch_level
            suffix = group if layer == num_layers - 1 else f"{group}_{layer}"
            losses[f"loss_kd_mlkd_{suffix}"] = value
        return losses

    def extra_repr(self):
        return (
            f"temperatures={self.temperatures}, weights=({self.instance_weight}, "
            f"{self.class_weight}, {self.batch_weight}), mask_quantile={self.mask_quantile} "
            f"({self.mask_keep}), "
            f"softmax={self.softmax}"
        )
