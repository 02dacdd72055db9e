# Copyright (c) kd_detr contributors.
"""FitNet hints (Romero et al., ICLR 2015) for DETR-family students: a learned adapter maps the
student's features to the teacher's width and an MSE pulls them together.

Features (``MODEL.KD.FITNET.FEATURES``): "encoder", the encoder memory (B, S, d) of both models
(a linear adapter d_s -> d_t, MSE over the tokens that are not padding in the student's mask),
and / or backbone outputs by name (e.g. "res5", "stage5": a 1 x 1 convolution C_s -> C_t, the
adapted map resized bilinearly to the teacher's when their sizes differ, MSE over all elements).
The adapters are parameters of the term: optimised with the student and checkpointed with it
("kd_losses"), never part of the teacher.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import CONFIG_EXTENSION_REGISTRY
from .context import KDContext
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = ["FitNetLoss", "add_fitnet_config"]

ENCODER = "encoder"


@CONFIG_EXTENSION_REGISTRY.register(name="distill_fitnet")
def add_fitnet_config(cfg):
    """Add ``MODEL.KD.FITNET`` (the ``FitNetLoss`` term)."""
    cfg.MODEL.KD.FITNET = CN()
    # Features to mimic: "encoder" (encoder memory) and / or backbone output names present in
    # both models (e.g. "res4", "res5"; EfficientNet-Lite: "stage4", "stage5").
    cfg.MODEL.KD.FITNET.FEATURES = [ENCODER]
    # Weight of each feature's MSE.
    cfg.MODEL.KD.FITNET.WEIGHT = 1.0


@KD_LOSS_REGISTRY.register()
class FitNetLoss(KDTerm):
    """FitNet hints on the encoder memory and / or backbone maps; keys
    ``loss_kd_fitnet_<feature>``."""

    @configurable
    def __init__(self, *, features: Sequence[str] = (ENCODER,), weight: float = 1.0):
        super().__init__()
        if not features:
            raise ValueError("MODEL.KD.FITNET.FEATURES is empty: name at least one feature")
        self.features = list(features)
        self.weight = float(weight)
        needs = {"encoder_memory" if f == ENCODER else "backbone_features" for f in self.features}
        self.inputs = frozenset(needs)  # per instance: what the configured features need
        self.adapters = nn.ModuleDict()

    @classmethod
    def from_config(cls, cfg):
        fit = cfg.MODEL.KD.FITNET
        return {"features": list(fit.FEATURES), "weight": fit.WEIGHT}

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Create one adapter per feature from the models' widths.

        Raises:
            ValueError: a backbone feature one of the models does not output (naming both
                models' outputs).
        """
        for name in self.features:
            if name in self.adapters:
                continue
            if name == ENCODER:
                self.adapters[name] = nn.Linear(student.hidden_dim, teacher.hidden_dim)
                continue
            shapes = {}
            for role, model in (("student", student), ("teacher", teacher)):
                out = model.backbone.output_shape()
                if name not in out:
                    raise ValueError(
                        f"FitNetLoss (MODEL.KD.FITNET.FEATURES) needs the backbone feature "
                        f"{name!r}, but the {role} ({type(model).__name__}) outputs only "
                        f"{sorted(out)}: name a feature both backbones output"
                    )
                shapes[role] = out[name].channels
            adapter = nn.Conv2d(shapes["student"], shapes["teacher"], kernel_size=1)
            self.adapters[name] = adapter

    def _encoder_loss(self, context: KDContext) -> torch.Tensor:
        s, t = context.encoder_memory("student"), context.encoder_memory("teacher")
        if s["spatial_shapes"] != t["spatial_shapes"]:
            raise ValueError(
                f"FitNetLoss on the encoder memory needs the same token grid in both models; "
                f"student {s['spatial_shapes']}, teacher {t['spatial_shapes']}: mimic a backbone "
                "feature instead"
            )
        adapted = self.adapters[ENCODER](s["memory"].float())
        valid = (~s["padding_mask"]).float()[..., None]  # (B, S, 1)
        squared = (adapted - t["memory"].detach().float()) ** 2 * valid
        return squared.sum() / (valid.sum() * squared.shape[-1]).clamp(min=1)

    def _backbone_loss(self, name: str, context: KDContext) -> torch.Tensor:
        s = context.backbone_features("student")[name].float()
        t = context.backbone_features("teacher")[name].detach().float()
        adapted = self.adapters[name](s)
        if adapted.shape[-2:] != t.shape[-2:]:
            adapted = F.interpolate(
                adapted, size=t.shape[-2:], mode="bilinear", align_corners=False
            )
        return F.mse_loss(adapted, t)

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        losses = {}
        for name in self.features:
            if name == ENCODER:
                value = self._encoder_loss(context)
            else:
                value = self._backbone_loss(name, context)
            losses[f"loss_kd_fitnet_{name}"] = self.weight * value
        return losses

    def extra_repr(self):
        return f"features={self.features}, weight={self.weight}"
