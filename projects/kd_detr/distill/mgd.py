# Copyright (c) kd_detr contributors.
"""MGD: Masked Generative Distillation (Yang et al., ECCV 2022) on backbone feature maps.

For each named backbone map, with F_t (B, C, H, W) the teacher's map (detached) and F_s the
student's map after a 1 x 1 adapter C_s -> C_t (when the widths differ) resized to (H, W):
a random spatial mask keeps cell (i, j) of image b where u_bij <= 1 - lambda, u ~ U[0, 1)
drawn as ``torch.rand((B, 1, H, W))`` (so a fraction lambda of the cells is dropped), and a
generation block G = conv3x3 -> ReLU -> conv3x3 (C_t -> C_t) must rebuild the teacher's full map
from the masked student map:

    L_mgd = alpha * sum_{b,c,i,j} (G(F_s * mask) - F_t)^2 / B

(the sum normalised by the batch size, as in the official code). The adapters and generation
blocks are parameters of the term: optimised with the student, checkpointed as "kd_losses",
never part of the teacher. The mask uses the global RNG (seeded by SEED), or ``generator`` when
one is set on the term (tests).
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import CONFIG_EXTENSION_REGISTRY
from .context import KDContext
from .feature_maps import backbone_feature_pairs, resize_to
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = ["MGDLoss", "add_mgd_config", "generation_block"]


@CONFIG_EXTENSION_REGISTRY.register(name="distill_mgd")
def add_mgd_config(cfg):
    """Add ``MODEL.KD.MGD`` (the ``MGDLoss`` term). Defaults: the official one-stage detection
    recipe (yzd-v/MGD det/configs/distillers/mgd/retina_rx101_64x4d_distill_retina_r50_*.py)."""
    cfg.MODEL.KD.MGD = CN()
    # Backbone output names present in both models (ResNet "res5"; EfficientNet-Lite "stage4").
    cfg.MODEL.KD.MGD.FEATURES = ["res5"]
    # alpha: weight of the generation loss.
    cfg.MODEL.KD.MGD.ALPHA = 2e-5
    # lambda: fraction of the spatial cells masked out.
    cfg.MODEL.KD.MGD.MASK_RATIO = 0.65


def generation_block(channels: int) -> nn.Sequential:
    """MGD's generation block: conv3x3 -> ReLU -> conv3x3, width kept, size kept."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


@KD_LOSS_REGISTRY.register()
class MGDLoss(KDTerm):
    """Masked generative distillation of backbone maps; keys ``loss_kd_mgd_<feature>``."""

    inputs = frozenset({"backbone_features"})

    @configurable
    def __init__(
        self, *, features: Sequence[str] = ("res5",), alpha: float = 2e-5, mask_ratio: float = 0.65
    ):
        super().__init__()
        if not features:
            raise ValueError("MODEL.KD.MGD.FEATURES is empty: name at least one backbone feature")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MODEL.KD.MGD.MASK_RATIO must be in [0, 1), got {mask_ratio}")
        self.features = list(features)
        self.alpha = float(alpha)
        self.mask_ratio = float(mask_ratio)
        self.adapters = nn.ModuleDict()  # only for features whose widths differ
        self.generators = nn.ModuleDict()
        # Draws the masks when set (a torch.Generator on any device); else the global RNG.
        self.generator: Optional[torch.Generator] = None

    @classmethod
    def from_config(cls, cfg):
        mgd = cfg.MODEL.KD.MGD
        return {"features": list(mgd.FEATURES), "alpha": mgd.ALPHA, "mask_ratio": mgd.MASK_RATIO}

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Create the adapters and generation blocks from the models' widths.

        Raises:
            ValueError: a model has no backbone maps or lacks one of the features.
        """
        pairs = backbone_feature_pairs(
            "MGDLoss", "MODEL.KD.MGD.FEATURES", self.features, student, teacher
        )
        for name, pair in pairs.items():
            if name in self.generators:
                continue
            if pair.student_channels != pair.teacher_channels:
                self.adapters[name] = nn.Conv2d(
                    pair.student_channels, pair.teacher_channels, kernel_size=1
                )
            self.generators[name] = generation_block(pair.teacher_channels)

    def random_mask(self, batch: int, height: int, width: int, device) -> torch.Tensor:
        """(B, 1, H, W) float: 1 keeps a cell, 0 drops it (probability ``mask_ratio``)."""
        gen_device = self.generator.device if self.generator is not None else device
        u = torch.rand((batch, 1, height, width), generator=self.generator, device=gen_device)
        return (u <= 1.0 - self.mask_ratio).float().to(device)

    def feature_loss(self, name: str, student: torch.Tensor, teacher: torch.Tensor):
        """The loss of one map: student (B, C_s, h, w), teacher (B, C_t, H, W)."""
        if name not in self.generators:
            raise RuntimeError("MGDLoss.bind(student, teacher) must run before the first step")
        t = teacher.detach().float()
        s = student.float()
        if name in self.adapters:
            s = self.adapters[name](s)
        s = resize_to(s, t)
        b, _, h, w = t.shape
        generated = self.generators[name](s * self.random_mask(b, h, w, t.device))
        return self.alpha * ((generated - t) ** 2).sum() / b

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        student = context.backbone_features("student")
        teacher = context.backbone_features("teacher")
        return {
            f"loss_kd_mgd_{name}": self.feature_loss(name, student[name], teacher[name])
            for name in self.features
        }

    def extra_repr(self):
        return f"features={self.features}, alpha={self.alpha}, mask_ratio={self.mask_ratio}"
