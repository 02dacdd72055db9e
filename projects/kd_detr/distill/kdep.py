# Copyright (c) kd_detr contributors.
"""KDEP feature distillation (He et al., CVPR 2022, "Knowledge Distillation as Efficient
Pre-training") on backbone feature maps: a non-parametric alignment, no adapter.

For each named backbone map, with the teacher's map (B, C_t, H, W) (detached) flattened to the
rows X (B H W, C_t) and the student's map resized to (H, W) flattened to Y (B H W, C_s):

1. SVD of the centred teacher rows, X - mu = U Sigma V^T, computed per batch (mu the mean row);
   V_k = the k = C_s right singular vectors of the largest singular values. We obtain them as the
   top eigenvectors of the Gram matrix (X - mu)^T (X - mu) in float64 (same subspace; C_t x C_t,
   cheaper than an SVD of the tall matrix and defined for any number of rows).
2. Sign: a singular vector is defined up to its sign, which the decomposition returns
   arbitrarily; we flip each column of V_k so that its entry of largest magnitude is positive.
   The targets are then a function of the teacher's features alone (X and -X get the same basis).
3. Projection P = (X - mu) V_k = U_k Sigma_k: each coordinate carries its singular value.
4. Power temperature scaling (PTS), compressing the dominant directions:
   P'' = sign(P) |P / tau|^(1 / n), tau = 0.1, n = 3.
5. Loss: w * mean (Y - P'')^2 (MSE), w = 3.0.

tau, n and w are the official code's (CVMI-Lab/KDEP src/resnet.py, the PTS of
``ResNet_feat_svd_pre_relu``; scripts/KDEP_MS-R50_R18.sh ``loss_w`` 3.0). The paper fits the SVD
once on teacher features of a 10% ImageNet subset (pooled pre-ReLU vectors); here it is fitted on
every batch's feature map cells (see docs/KD_ZOO.md).
"""
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import CONFIG_EXTENSION_REGISTRY
from .context import KDContext
from .feature_maps import backbone_feature_pairs, resize_to
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = ["KDEPLoss", "add_kdep_config", "kdep_targets", "svd_basis"]


@CONFIG_EXTENSION_REGISTRY.register(name="distill_kdep")
def add_kdep_config(cfg):
    """Add ``MODEL.KD.KDEP`` (the ``KDEPLoss`` term). Defaults: the official code (CVMI-Lab/KDEP
    src/resnet.py PTS, scripts/KDEP_MS-R50_R18.sh loss weight)."""
    cfg.MODEL.KD.KDEP = CN()
    # Backbone output names present in both models; the student's width must not exceed the
    # teacher's (ResNet "res5": R18 512 <= R50 2048; EfficientNet-Lite "stage4": 112 <= 120).
    cfg.MODEL.KD.KDEP.FEATURES = ["res5"]
    # Weight w of the MSE.
    cfg.MODEL.KD.KDEP.WEIGHT = 3.0
    # Power temperature scaling sign(P) |P / tau|^(1 / n).
    cfg.MODEL.KD.KDEP.PTS_TEMPERATURE = 0.1  # tau
    cfg.MODEL.KD.KDEP.PTS_POWER = 3.0  # n


@torch.no_grad()
def svd_basis(rows: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and top-k right singular vectors of ``rows`` (N, C) centred, sign-fixed.

    Returns:
        mean (C,) and basis (C, k), float64, columns ordered by decreasing singular value, each
        column's largest-magnitude entry positive.
    """
    rows = rows.double()
    mean = rows.mean(dim=0)
    centred = rows - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    basis = vectors[:, -k:].flip(-1) if k > 0 else vectors[:, :0]
    pivot = basis.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(basis.gather(0, pivot[None]))  # (1, k)
    return mean, basis * torch.where(signs == 0, torch.ones_like(signs), signs)


@torch.no_grad()
def kdep_targets(
    teacher_rows: torch.Tensor, k: int, temperature: float = 0.1, power: float = 3.0
) -> torch.Tensor:
    """KDEP's targets of teacher rows (N, C_t): PTS of the top-k SVD coordinates, (N, k) float32
    (steps 1 to 4 of the module docstring)."""
    with torch.autocast(device_type=teacher_rows.device.type, enabled=False):  # float64 kept
        mean, basis = svd_basis(teacher_rows, k)
        projected = (teacher_rows.double() - mean) @ basis
        scaled = torch.sign(projected) * (projected.abs() / temperature) ** (1.0 / power)
    return scaled.float()


@KD_LOSS_REGISTRY.register()
class KDEPLoss(KDTerm):
    """KDEP (SVD + PTS aligned MSE) on backbone maps; keys ``loss_kd_kdep_<feature>``. No
    parameters."""

    inputs = frozenset({"backbone_features"})

    @configurable
    def __init__(
        self,
        *,
        features: Sequence[str] = ("res5",),
        weight: float = 3.0,
        pts_temperature: float = 0.1,
        pts_power: float = 3.0,
    ):
        super().__init__()
        if not features:
            raise ValueError("MODEL.KD.KDEP.FEATURES is empty: name at least one backbone feature")
        if pts_temperature <= 0 or pts_power <= 0:
            raise ValueError(
                "MODEL.KD.KDEP.PTS_TEMPERATURE and PTS_POWER must be > 0, got "
                f"{pts_temperature} and {pts_power}"
            )
        self.features = list(features)
        self.weight = float(weight)
        self.pts_temperature = float(pts_temperature)
        self.pts_power = float(pts_power)

    @classmethod
    def from_config(cls, cfg):
        kdep = cfg.MODEL.KD.KDEP
        return {
            "features": list(kdep.FEATURES),
            "weight": kdep.WEIGHT,
            "pts_temperature": kdep.PTS_TEMPERATURE,
            "pts_power": kdep.PTS_POWER,
        }

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Check the maps exist and the student is not wider than the teacher.

        Raises:
            ValueError: a model lacks a feature, or the student's map is wider than the
                teacher's (an SVD cannot widen it).
        """
        pairs = backbone_feature_pairs(
            "KDEPLoss", "MODEL.KD.KDEP.FEATURES", self.features, student, teacher
        )
        for name, pair in pairs.items():
            if pair.student_channels > pair.teacher_channels:
                raise ValueError(
                    f"KDEPLoss (MODEL.KD.KDEP.FEATURES) reduces the teacher's {name!r} map "
                    f"({pair.teacher_channels} channels) by SVD to the student's width, but the "
                    f"student's is wider ({pair.student_channels}): distil that map with a "
                    "learned adapter instead (FitNetLoss, FGDLoss or MGDLoss)"
                )

    def feature_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The loss of one map: student (B, C_s, h, w), teacher (B, C_t, H, W)."""
        t = teacher.detach().float()
        s = resize_to(student.float(), t)
        width = s.shape[1]
        if width > t.shape[1]:
            raise ValueError(
                f"KDEPLoss: the student's map ({width} channels) is wider than the teacher's "
                f"({t.shape[1]})"
            )
        target = kdep_targets(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]), width,
                              self.pts_temperature, self.pts_power)  # fmt: skip
        rows = s.permute(0, 2, 3, 1).reshape(-1, width)
        return self.weight * ((rows - target) ** 2).mean()

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        student = context.backbone_features("student")
        teacher = context.backbone_features("teacher")
        return {
            f"loss_kd_kdep_{name}": self.feature_loss(student[name], teacher[name])
            for name in self.features
        }

    def extra_repr(self):
        return (
            f"features={self.features}, weight={self.weight}, "
            f"pts_temperature={self.pts_temperature}, pts_power={self.pts_power}"
        )
