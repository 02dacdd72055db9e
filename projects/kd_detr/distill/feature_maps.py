# Copyright (c) kd_detr contributors.
"""Shared plumbing of the backbone-feature KD terms (FGD, MGD, KDEP): the start-up check that
both models output the named backbone maps, and resizing a student map to the teacher's grid."""
from typing import Dict, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeaturePair", "backbone_feature_pairs", "resize_to"]


class FeaturePair(NamedTuple):
    """Channels and strides (input pixels per map cell) of one backbone map in both models."""

    student_channels: int
    teacher_channels: int
    student_stride: int
    teacher_stride: int


def backbone_feature_pairs(
    term: str, key: str, names: Sequence[str], student: nn.Module, teacher: nn.Module
) -> Dict[str, FeaturePair]:
    """The shapes of the backbone maps ``names`` in both models.

    Args:
        term: the term's class name, for the error message.
        key: the config key that lists the maps (e.g. "MODEL.KD.FGD.FEATURES").
        names: backbone output names (e.g. "res5", "stage4").
        student, teacher: the unwrapped models.

    Raises:
        ValueError: a model has no Detectron2 backbone with ``output_shape()`` or does not output
            one of the names (the message names the term, the model and what it outputs).
    """
    shapes = {}
    for role, model in (("student", student), ("teacher", teacher)):
        backbone = getattr(model, "backbone", None)
        if backbone is None or not hasattr(backbone, "output_shape"):
            raise ValueError(
                f"{term} ({key}) distils backbone feature maps, but the {role} "
                f"({type(model).__name__}) has no backbone with output_shape(): use a DETR-family "
                "model with a Detectron2 backbone"
            )
        shapes[role] = backbone.output_shape()
    pairs = {}
    for name in names:
        for role in ("student", "teacher"):
            if name not in shapes[role]:
                model = student if role == "student" else teacher
                raise ValueError(
                    f"{term} ({key}) needs the backbone feature {name!r}, but the {role} "
                    f"({type(model).__name__}) outputs only {sorted(shapes[role])}: name a "
                    "feature both backbones output"
                )
        s, t = shapes["student"][name], shapes["teacher"][name]
        pairs[name] = FeaturePair(s.channels, t.channels, s.stride or 1, t.stride or 1)
    return pairs


def resize_to(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``features`` (B, C, h, w) resized bilinearly (no corner alignment) to the (H, W) of
    ``reference`` (B, C', H, W); returned unchanged when the sizes agree."""
    if features.shape[-2:] == reference.shape[-2:]:
        return features
    return F.interpolate(features, size=reference.shape[-2:], mode="bilinear", align_corners=False)
