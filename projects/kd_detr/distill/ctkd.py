# Copyright (c) kd_detr contributors.
"""CTKD, curriculum temperature KD (Li et al., AAAI 2023), on paired point groups.

The distillation temperature is learnable and trained *adversarially*: it is passed through a
gradient-reversal layer (GRL: identity forward, gradient times -lambda backward), so the student
minimises the KD loss while the temperature maximises it, with a strength lambda that grows on a
cosine curriculum of the iteration i (``context.iteration``):

  lambda(i) = LAMBDA_MIN + (LAMBDA_MAX - LAMBDA_MIN) (1 - cos(pi min(i, N) / N)) / 2,
  N = DECAY_ITERS (paper: 0 -> 1 over 10 epochs; the official code writes the same curve as
  lambda 0 -> -1 with a GRL that multiplies by lambda, which is this with the sign in the GRL).

Temperature, kept in (T_START, T_START + T_RANGE) (paper: (1, 21)):

* global: T = T_START + T_RANGE sigmoid(theta), one learnable scalar theta (init THETA_INIT = 1
  as the official code, T0 ~ 15.6);
* instance-wise: T_i = T_START + T_RANGE sigmoid(MLP([z^S_i, z^T_i])), a two-layer MLP (hidden
  MLP_HIDDEN, ReLU) on the concatenated (detached) student final-layer and teacher logits of
  point i; one temperature per point, shared by all student layers.

Per point, with the (reversed) temperature T:

* softmax models (K = C + 1 logits): KL(softmax(z^T / T) || softmax(z^S / T)) T^2;
* sigmoid (focal) models (K = C), q = sigmoid(z / T):
  sum_c KL(Bern(q^T_c) || Bern(q^S_c)) T^2.

loss = sum_i w_i loss_i / W with the point weights w and W their sum over all ranks / world size
(as DKD). Every student decoder layer is distilled against the teacher's final layer. The mean
temperature goes to the EventStorage as ``kd_ctkd_temperature``. The temperature's parameters
live in the term (optimised with the student, checkpointed under "kd_losses"); lambda depends on
the iteration only, so resuming needs no extra state.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..config import CONFIG_EXTENSION_REGISTRY
from .context import KDContext
from .losses import all_reduce_sum
from .registry import KD_LOSS_REGISTRY
from .term import PointKDTerm

__all__ = ["CTKDLoss", "GradientReversal", "add_ctkd_config", "ctkd_lambda", "kl_at_temperature"]

_EPS = 1e-12
_MODES = ("global", "instance")


@CONFIG_EXTENSION_REGISTRY.register(name="distill_ctkd")
def add_ctkd_config(cfg):
    """Add ``MODEL.KD.CTKD`` (the ``CTKDLoss`` term)."""
    cfg.MODEL.KD.CTKD = CN()
    # "global" (one learnable temperature) or "instance" (an MLP per point).
    cfg.MODEL.KD.CTKD.MODE = "global"
    # T = T_START + T_RANGE * sigmoid(theta) (CTKD: t_start 1, t_end 20, so T in (1, 21)).
    cfg.MODEL.KD.CTKD.T_START = 1.0
    cfg.MODEL.KD.CTKD.T_RANGE = 20.0
    # Initial theta of the global temperature (CTKD: 1.0, T0 = 1 + 20 sigmoid(1) ~ 15.6).
    cfg.MODEL.KD.CTKD.THETA_INIT = 1.0
    # Hidden width of the instance-wise temperature MLP.
    cfg.MODEL.KD.CTKD.MLP_HIDDEN = 64
    # GRL strength: cosine from LAMBDA_MIN to LAMBDA_MAX over DECAY_ITERS (CTKD: 0 -> 1, 10 ep).
    cfg.MODEL.KD.CTKD.LAMBDA_MIN = 0.0
    cfg.MODEL.KD.CTKD.LAMBDA_MAX = 1.0
    cfg.MODEL.KD.CTKD.DECAY_ITERS = 10000
    # Multiplies the loss.
    cfg.MODEL.KD.CTKD.WEIGHT = 1.0
    # Learning rate of the temperature parameters: SOLVER.BASE_LR x LR_FACTOR (CTKD trains them
    # with the student's optimizer and lr, factor 1; DETR's AdamW lr of 1e-4 moves theta by at
    # most ~1e-4 per step, so a larger factor lets the curriculum act in short schedules).
    cfg.MODEL.KD.CTKD.LR_FACTOR = 1.0


def ctkd_lambda(iteration: int, lambda_min: float, lambda_max: float, decay_iters: int) -> float:
    """The cosine curriculum of the GRL strength (module doc)."""
    if decay_iters <= 0:
        return float(lambda_max)
    progress = min(max(int(iteration), 0), decay_iters) / decay_iters
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * progress)) / 2.0


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


class GradientReversal(nn.Module):
    """Identity forward; the gradient times ``-strength`` backward."""

    def forward(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        return _GradReverse.apply(x, float(strength))


def kl_at_temperature(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: torch.Tensor,
    softmax: bool,
) -> torch.Tensor:
    """Per-point KL(teacher || student) at ``temperature`` (broadcast to (..., 1)) times T^2.

    Args:
        student_logits, teacher_logits (Tensor): (..., K).
        temperature (Tensor): a scalar or (...,) per point.
        softmax (bool): softmax logits (else sigmoid, a sum of per-class Bernoulli KLs).

    Returns:
        Tensor: (...,).
    """
    temperature = torch.as_tensor(temperature, dtype=student_logits.dtype)
    t = temperature[..., None] if temperature.dim() > 0 else temperature
    zs, zt = student_logits / t, teacher_logits.detach() / t
    if softmax:
        log_t, log_s = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        q_t = zt.sigmoid()
        kl = (q_t * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - q_t) * (
            F.logsigmoid(-zt) - F.logsigmoid(-zs)
        )).sum(-1)  # fmt: skip
    return kl * temperature**2


@KD_LOSS_REGISTRY.register()
class CTKDLoss(PointKDTerm):
    """CTKD at every paired point group (``MODEL.KD.LOSSES ['CTKDLoss']``, ``MODEL.KD.CTKD.*``);
    keys ``loss_kd_ctkd_<group>[_<layer>]``. The class type (softmax / sigmoid) is the student's
    (``MODEL.DETR.USE_FOCAL_LOSS``); ``num_logits`` K sizes the instance-wise MLP."""

    @configurable
    def __init__(
        self, *, mode: str = "global", t_start: float = 1.0, t_range: float = 20.0,
        theta_init: float = 1.0, mlp_hidden: int = 64, num_logits: int = 0,
        lambda_min: float = 0.0, lambda_max: float = 1.0, decay_iters: int = 10000,
        weight: float = 1.0, softmax: bool = True, lr_factor: float = 1.0,
    ):  # fmt: skip
        super().__init__()
        if lr_factor <= 0:
            raise ValueError(f"MODEL.KD.CTKD.LR_FACTOR must be > 0, got {lr_factor}")
        self.lr_factor = float(lr_factor)
        if mode not in _MODES:
            raise ValueError(f"MODEL.KD.CTKD.MODE must be one of {_MODES}, got {mode!r}")
        if t_start <= 0 or t_range < 0:
            raise ValueError(f"CTKD needs T_START > 0 and T_RANGE >= 0, got {t_start}, {t_range}")
        self.mode = mode
        self.t_start, self.t_range = float(t_start), float(t_range)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.decay_iters = int(decay_iters)
        self.weight = float(weight)
        self.softmax = bool(softmax)
        self.grl = GradientReversal()
        self.strength = self.lambda_min  # set from the iteration at every call
        if mode == "global":
            self.theta = nn.Parameter(torch.tensor(float(theta_init)))
        else:
            if num_logits <= 0:
                raise ValueError("CTKD instance mode needs num_logits > 0")
            self.mlp = nn.Sequential(
                nn.Linear(2 * num_logits, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, 1)
            )

    @classmethod
    def from_config(cls, cfg):
        ctkd = cfg.MODEL.KD.CTKD
        detr = cfg.MODEL.get("DETR")
        softmax = detr is None or not detr.USE_FOCAL_LOSS
        num_logits = 0 if detr is None else detr.NUM_CLASSES + int(softmax)
        return {
            "mode": ctkd.MODE, "t_start": ctkd.T_START, "t_range": ctkd.T_RANGE,
            "theta_init": ctkd.THETA_INIT, "mlp_hidden": ctkd.MLP_HIDDEN,
            "num_logits": num_logits, "lambda_min": ctkd.LAMBDA_MIN,
            "lambda_max": ctkd.LAMBDA_MAX, "decay_iters": ctkd.DECAY_ITERS,
            "weight": ctkd.WEIGHT, "softmax": softmax, "lr_factor": ctkd.LR_FACTOR,
        }  # fmt: skip

    def temperature(
        self, student_logits: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:  # fmt: skip
        """The temperature after the GRL: a scalar (global) or (B, M) (instance-wise, from the
        student's (B, M, K) final-layer and the teacher's logits, both detached)."""
        if self.mode == "global":
            theta = self.theta
        else:
            features = torch.cat([student_logits.detach(), teacher_logits.detach()], -1)
            theta = self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1)
        return self.t_start + self.t_range * torch.sigmoid(self.grl(theta, self.strength))

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        self.strength = ctkd_lambda(
            context.iteration, self.lambda_min, self.lambda_max, self.decay_iters
        )
        try:
            storage = get_event_storage()
        except AssertionError:  # no EventStorage active: nothing to log (and no device sync)
            storage = None
        self._logged = [] if storage is not None else None
        losses = super().forward(context)
        if storage is not None:
            if self._logged:
                storage.put_scalar("kd_ctkd_temperature", sum(self._logged) / len(self._logged))
            storage.put_scalar("kd_ctkd_lambda", self.strength)
        self._logged = None
        return losses

    def pair_losses(
        self, student: Dict, teacher: Dict, weights: Optional[torch.Tensor], group: str
    ) -> Dict[str, torch.Tensor]:
        s_logits = student["pred_logits"].float()
        s_logits = s_logits[None] if s_logits.dim() == 3 else s_logits  # (L, B, M, K)
        t_logits = teacher["pred_logits"].detach().float()  # (B, M, K)
        if weights is None:
            weights = t_logits.new_ones(t_logits.shape[:-1])
        weights = weights.detach().float()
        norm = (all_reduce_sum(weights.sum()) / comm.get_world_size()).clamp(min=_EPS)
        temperature = self.temperature(s_logits[-1], t_logits)
        if temperature.numel() > 0 and getattr(self, "_logged", None) is not None:
            self._logged.append(temperature.detach().float().mean().item())
        losses = {}
        for layer in range(s_logits.shape[0]):
            per_point = kl_at_temperature(s_logits[layer], t_logits, temperature, self.softmax)
            value = self.weight * (weights * per_point).sum() / norm
            suffix = group if layer == s_logits.shape[0] - 1 else f"{group}_{layer}"
            losses[f"loss_kd_ctkd_{suffix}"] = value
        return losses

    def extra_repr(self):
        return (
            f"mode={self.mode}, T in ({self.t_start}, {self.t_start + self.t_range}), "
            f"lambda {self.lambda_min} -> {self.lambda_max} over {self.decay_iters} iters, "
            f"weight={self.weight}, softmax={self.softmax}"
        )
