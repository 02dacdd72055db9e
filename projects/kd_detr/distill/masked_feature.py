# Copyright (c) kd_detr contributors.
"""Incremental-DETR's distillation (Dong et al., AAAI 2023): class-incremental fine-tuning in
which the base model (teacher) keeps the student's base classes.

* ``MODEL.KD.BASE_CLASSES``: the class term of ``KDDETRLoss`` (KD-DETR's points) compares only
  the base classes' logits (plus the background logit of softmax classifiers), so the base
  model's untrained novel scores are never distilled (:func:`base_class_indices`).
* ``MaskedFeatureKDLoss``: the masked feature distillation of the paper on the encoder memory,
  ``L = 1 / (2 N) sum_{cells with mask 0} sum_k (f_s - f_t)^2``, where ``mask`` is 1 on the cells
  that a novel ground-truth box touches (and on padding) and N counts the cells with mask 0 over
  the batch: features are kept where the novel objects are not, leaving the student free to
  change them on the novel objects. Cells follow FGD's box-to-cell rule
  (:func:`~kd_detr.distill.fgd.fgd_box_masks`).
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.utils import comm

from ..config import CONFIG_EXTENSION_REGISTRY
from .base_classes import config_base_classes
from .context import KDContext
from .fgd import fgd_box_masks
from .registry import KD_LOSS_REGISTRY
from .term import KDTerm

__all__ = ["MaskedFeatureKDLoss", "add_incremental_kd_config", "novel_feature_mask"]


@CONFIG_EXTENSION_REGISTRY.register(name="distill_incremental")
def add_incremental_kd_config(cfg):
    """Add ``MODEL.KD.BASE_CLASSES`` and ``MODEL.KD.MASKED_FEATURE.*`` (in place)."""
    kd = cfg.MODEL.KD
    # Incremental-DETR: contiguous 0-based ids of the classes the teacher (the base model) knows.
    # KDDETRLoss's class term then compares only these logits (plus the background logit of a
    # softmax classifier); MaskedFeatureKDLoss masks the boxes of every other (novel) class.
    # []: every class (plain KD).
    kd.BASE_CLASSES = []
    kd.MASKED_FEATURE = CN()
    # lambda_feat: multiplier of MaskedFeatureKDLoss (encoder memory outside novel boxes).
    kd.MASKED_FEATURE.WEIGHT = 1.0


def novel_feature_mask(
    targets: List[Dict[str, torch.Tensor]],
    base_classes: Sequence[int],
    image_sizes: Sequence,
    padded_size,
    spatial_shapes: Sequence,
    padding_mask: torch.Tensor,
) -> torch.Tensor:
    """(B, S) bool, True on the cells excluded from the feature term: those a novel ground-truth
    box touches, on every level, and padding.

    Args:
        targets: per image "labels" (T,) and "boxes" (T, 4) cxcywh normalised by the unpadded
            image size (``KDContext.targets``).
        base_classes: the base class ids; every other label is novel.
        image_sizes: unpadded (h, w) per image; padded_size: (H, W) of the padded batch.
        spatial_shapes: (h, w) per level of the memory; padding_mask: (B, S) True on padding.
    """
    base = torch.tensor(list(base_classes), dtype=torch.long)
    novel = []
    for t in targets:
        keep = ~torch.isin(t["labels"], base.to(t["labels"].device))
        novel.append({"boxes": t["boxes"][keep]})
    levels = []
    for h, w in spatial_shapes:
        stride = padded_size[0] / h
        fg, _ = fgd_box_masks(novel, image_sizes, stride, (h, w))
        levels.append((fg > 0).flatten(1))
    return torch.cat(levels, dim=1).to(padding_mask.device) | padding_mask


@KD_LOSS_REGISTRY.register()
class MaskedFeatureKDLoss(KDTerm):
    """Incremental-DETR's masked feature distillation on the encoder memory (module doc).

    Keys: ``loss_kd_masked_feature``. Config: ``MODEL.KD.BASE_CLASSES`` (required: the novel
    classes are the others), ``MODEL.KD.MASKED_FEATURE.WEIGHT``. Teacher and student must have
    encoder memories of the same width and levels (the incremental student is the base model's
    architecture).
    """

    inputs = frozenset({"encoder_memory", "targets"})

    @configurable
    def __init__(self, *, base_classes: Sequence[int], weight: float = 1.0):
        super().__init__()
        if not base_classes:
            raise ValueError(
                "MaskedFeatureKDLoss needs MODEL.KD.BASE_CLASSES (the base classes' ids): the "
                "boxes of the other (novel) classes are masked."
            )
        self.base_classes = [int(c) for c in base_classes]
        self.weight = float(weight)
        self.size_divisibility = 1

    @classmethod
    def from_config(cls, cfg):
        return {
            "base_classes": config_base_classes(cfg),
            "weight": cfg.MODEL.KD.MASKED_FEATURE.WEIGHT,
        }

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        s_dim, t_dim = getattr(student, "hidden_dim", None), getattr(teacher, "hidden_dim", None)
        if s_dim is None or s_dim != t_dim:
            raise ValueError(
                f"MaskedFeatureKDLoss compares encoder memories: student "
                f"{type(student).__name__} (hidden_dim {s_dim}) and teacher "
                f"{type(teacher).__name__} (hidden_dim {t_dim}) must have the same width."
            )
        self.size_divisibility = int(getattr(student, "size_divisibility", 1) or 1)

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        s_mem, t_mem = context.encoder_memory("student"), context.encoder_memory("teacher")
        if s_mem["spatial_shapes"] != t_mem["spatial_shapes"]:
            raise ValueError(
                f"MaskedFeatureKDLoss: student memory levels {s_mem['spatial_shapes']} differ "
                f"from the teacher's {t_mem['spatial_shapes']}."
            )
        d = self.size_divisibility
        sizes = context.image_sizes
        padded = tuple(math.ceil(max(s[i] for s in sizes) / d) * d for i in (0, 1))
        excluded = novel_feature_mask(
            context.targets, self.base_classes, sizes, padded, s_mem["spatial_shapes"],
            s_mem["padding_mask"],
        )  # fmt: skip
        keep = (~excluded).float()
        diff = (s_mem["memory"].float() - t_mem["memory"].detach().float()).pow(2).sum(-1)
        count = keep.sum()
        if comm.get_world_size() > 1:  # the global count / world size, as KD-DETR's normaliser
            count = count.clone()
            dist.all_reduce(count)
            count = count / comm.get_world_size()
        count = count.clamp(min=1.0)
        loss = (diff * keep).sum() / (2.0 * count)
        return {"loss_kd_masked_feature": self.weight * loss}

    def extra_repr(self):
        return f"base_classes={self.base_classes}, weight={self.weight}"
