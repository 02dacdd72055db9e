# Copyright (c) kd_detr contributors.
"""FGD: Focal and Global Distillation (Yang et al., CVPR 2022) on backbone feature maps.

For each named backbone map, with F_t (B, C, H, W) the teacher's map (detached) and F_s the
student's map after a 1 x 1 adapter C_s -> C_t (when the widths differ) resized to (H, W):

- masks from the ground-truth boxes on the teacher's grid: M_ij = 1 on cells a box covers, and
  the scale mask S_ij = 1 / (H_r W_r) there (H_r x W_r the cells of box r; the smallest box wins
  where boxes overlap), S_ij = 1 / N_bg on the N_bg background cells;
- spatial and channel attention at temperature T: A^S = H W softmax_ij(mean_c |F| / T),
  A^C = C softmax_c(mean_ij |F| / T);
- focal loss: alpha sum M S A^S_t A^C_t (F_t - F_s)^2 + beta sum (1 - M) S A^S_t A^C_t
  (F_t - F_s)^2, plus the attention loss gamma (sum |A^S_t - A^S_s| + sum |A^C_t - A^C_s|);
- global loss: lambda sum (R_t(F_t) - R_s(F_s))^2 with R(F) = F + W_2 ReLU(LN(W_1 sum_j
  softmax_j(W_k F_j) F_j)), the GcBlock context model (one per model, as in the official code).

Sums run over the batch and are divided by B (the official normalisation). The adapters and
the context models are parameters of the term: optimised with the student, checkpointed as
"kd_losses", never part of the teacher.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import CONFIG_EXTENSION_REGISTRY
from .context import KDContext
from .feature_maps import backbone_feature_pairs, resize_to
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = [
    "FGDLoss",
    "GlobalContextBlock",
    "add_fgd_config",
    "fgd_attention",
    "fgd_box_masks",
]


@CONFIG_EXTENSION_REGISTRY.register(name="distill_fgd")
def add_fgd_config(cfg):
    """Add ``MODEL.KD.FGD`` (the ``FGDLoss`` term). Defaults: the official one-stage (RetinaNet)
    recipe, yzd-v/FGD configs/distillers/fgd/fgd_retina_*.py."""
    cfg.MODEL.KD.FGD = CN()
    # Backbone output names present in both models (ResNet "res5"; EfficientNet-Lite "stage4").
    cfg.MODEL.KD.FGD.FEATURES = ["res5"]
    # Attention temperature T (0.5 in every official recipe).
    cfg.MODEL.KD.FGD.TEMPERATURE = 0.5
    # alpha (foreground), beta (background), gamma (attention), lambda (global).
    cfg.MODEL.KD.FGD.ALPHA = 1e-3
    cfg.MODEL.KD.FGD.BETA = 5e-4
    cfg.MODEL.KD.FGD.GAMMA = 5e-4
    cfg.MODEL.KD.FGD.LAMBDA = 5e-6


def fgd_attention(features: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spatial and channel attention of a map.

    Args:
        features: (B, C, H, W).

    Returns:
        spatial (B, H, W) summing to H * W per image, channel (B, C) summing to C.
    """
    b, c, h, w = features.shape
    magnitude = features.abs()
    spatial = magnitude.mean(dim=1).reshape(b, h * w) / temperature
    spatial = (h * w) * F.softmax(spatial, dim=1).reshape(b, h, w)
    channel = c * F.softmax(magnitude.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial, channel


def fgd_box_masks(
    targets: List[Dict[str, torch.Tensor]],
    image_sizes: Sequence[Tuple[int, int]],
    stride: float,
    grid: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's scaled foreground and background masks on a map of ``grid`` = (H, W) cells.

    A box covers the cells its extent touches: columns floor(x1 / stride) .. ceil(x2 / stride) - 1
    (at least one), clipped to the map, likewise rows. Foreground cells hold 1 / (cells of the box)
    (the largest value, i.e. the smallest box, where boxes overlap); background cells hold
    1 / (number of background cells) of the image.

    Args:
        targets: per image "boxes" (T, 4) cxcywh normalised by the unpadded image size.
        image_sizes: unpadded (h, w) per image, in input pixels.
        stride: input pixels per map cell.
        grid: (H, W) of the map.

    Returns:
        foreground (B, H, W), background (B, H, W), float32.
    """
    height, width = grid
    fg, bg = [], []
    for target, (img_h, img_w) in zip(targets, image_sizes):
        boxes = target["boxes"].float()
        device = boxes.device
        mask = torch.zeros(height, width, device=device)
        if len(boxes):
            cx, cy, bw, bh = boxes.unbind(-1)
            x0 = torch.floor((cx - bw / 2) * img_w / stride).clamp(0, width - 1)
            x1 = torch.maximum(torch.ceil((cx + bw / 2) * img_w / stride).clamp(max=width), x0 + 1)
            y0 = torch.floor((cy - bh / 2) * img_h / stride).clamp(0, height - 1)
            y1 = torch.maximum(torch.ceil((cy + bh / 2) * img_h / stride).clamp(max=height), y0 + 1)
            rows = torch.arange(height, device=device, dtype=torch.float32)
            cols = torch.arange(width, device=device, dtype=torch.float32)
            in_rows = (rows[None] >= y0[:, None]) & (rows[None] < y1[:, None])  # (T, H)
            in_cols = (cols[None] >= x0[:, None]) & (cols[None] < x1[:, None])  # (T, W)
            inside = in_rows[:, :, None] & in_cols[:, None, :]  # (T, H, W)
            scale = 1.0 / ((y1 - y0) * (x1 - x0))  # (T,)
            mask = (inside.float() * scale[:, None, None]).amax(dim=0)
        background = (mask == 0).float()
        fg.append(mask)
        bg.append(background / background.sum().clamp(min=1))
    return torch.stack(fg), torch.stack(bg)


class GlobalContextBlock(nn.Module):
    """FGD's relation module R(F) = F + W_2 ReLU(LN(W_1 c)), c = sum_j softmax_j(W_k F_j) F_j
    (GcBlock context modelling), on (B, C, H, W) maps; W_1 halves the width. W_2 starts at zero
    (R is the identity at the start, as in the official code)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 1)
        self.attention = nn.Conv2d(channels, 1, kernel_size=1)  # W_k
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),  # W_1
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),  # W_2
        )
        nn.init.kaiming_normal_(self.attention.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.attention.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        weights = F.softmax(self.attention(features).reshape(b, h * w), dim=1)  # (B, HW)
        context = torch.einsum("bn,bcn->bc", weights, features.reshape(b, c, h * w))
        return features + self.transform(context[:, :, None, None])


@KD_LOSS_REGISTRY.register()
class FGDLoss(KDTerm):
    """Focal and global distillation of backbone maps; keys ``loss_kd_fgd_<feature>_fg``,
    ``_bg``, ``_attention`` and ``_global``."""

    inputs = frozenset({"targets", "backbone_features"})

    @configurable
    def __init__(
        self,
        *,
        features: Sequence[str] = ("res5",),
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lambda_: float = 5e-6,
    ):
        super().__init__()
        if not features:
            raise ValueError("MODEL.KD.FGD.FEATURES is empty: name at least one backbone feature")
        if temperature <= 0:
            raise ValueError(f"MODEL.KD.FGD.TEMPERATURE must be > 0, got {temperature}")
        self.features = list(features)
        self.temperature = float(temperature)
        self.alpha, self.beta, self.gamma, self.lambda_ = map(float, (alpha, beta, gamma, lambda_))
        self.adapters = nn.ModuleDict()  # only for features whose widths differ
        self.student_context = nn.ModuleDict()
        self.teacher_context = nn.ModuleDict()
        self.strides: Dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg):
        fgd = cfg.MODEL.KD.FGD
        return {
            "features": list(fgd.FEATURES),
            "temperature": fgd.TEMPERATURE,
            "alpha": fgd.ALPHA,
            "beta": fgd.BETA,
            "gamma": fgd.GAMMA,
            "lambda_": fgd.LAMBDA,
        }

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Create the adapters and context models from the models' widths.

        Raises:
            ValueError: a model has no backbone maps or lacks one of the features.
        """
        pairs = backbone_feature_pairs(
            "FGDLoss", "MODEL.KD.FGD.FEATURES", self.features, student, teacher
        )
        for name, pair in pairs.items():
            self.strides[name] = pair.teacher_stride
            if name in self.teacher_context:
                continue
            if pair.student_channels != pair.teacher_channels:
                self.adapters[name] = nn.Conv2d(
                    pair.student_channels, pair.teacher_channels, kernel_size=1
                )
            self.student_context[name] = GlobalContextBlock(pair.teacher_channels)
            self.teacher_context[name] = GlobalContextBlock(pair.teacher_channels)

    def feature_losses(
        self, name: str, student: torch.Tensor, teacher: torch.Tensor, context: KDContext
    ) -> Dict[str, torch.Tensor]:
        """The four losses of one map: student (B, C_s, h, w), teacher (B, C_t, H, W)."""
        if name not in self.teacher_context:
            raise RuntimeError("FGDLoss.bind(student, teacher) must run before the first step")
        t = teacher.detach().float()
        s = student.float()
        if name in self.adapters:
            s = self.adapters[name](s)
        s = resize_to(s, t)
        batch = t.shape[0]
        fg, bg = fgd_box_masks(context.targets, context.image_sizes, self.strides[name],
                               tuple(t.shape[-2:]))  # fmt: skip
        spatial_t, channel_t = fgd_attention(t, self.temperature)
        spatial_s, channel_s = fgd_attention(s, self.temperature)
        attention = spatial_t[:, None] * channel_t[:, :, None, None]  # (B, C, H, W)
        weighted = (t - s) ** 2 * attention
        fg_loss = (weighted * fg[:, None]).sum() / batch
        bg_loss = (weighted * bg[:, None]).sum() / batch
        attention_loss = ((spatial_t - spatial_s).abs().sum()
                          + (channel_t - channel_s).abs().sum()) / batch  # fmt: skip
        relation_t = self.teacher_context[name](t)
        relation_s = self.student_context[name](s)
        global_loss = ((relation_t - relation_s) ** 2).sum() / batch
        prefix = f"loss_kd_fgd_{name}"
        return {
            f"{prefix}_fg": self.alpha * fg_loss,
            f"{prefix}_bg": self.beta * bg_loss,
            f"{prefix}_attention": self.gamma * attention_loss,
            f"{prefix}_global": self.lambda_ * global_loss,
        }

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        student = context.backbone_features("student")
        teacher = context.backbone_features("teacher")
        losses = {}
        for name in self.features:
            losses.update(self.feature_losses(name, student[name], teacher[name], context))
        return losses

    def extra_repr(self):
        return (
            f"features={self.features}, temperature={self.temperature}, alpha={self.alpha}, "
            f"beta={self.beta}, gamma={self.gamma}, lambda={self.lambda_}"
        )
