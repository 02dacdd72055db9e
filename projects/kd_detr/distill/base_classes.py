# Copyright (c) kd_detr contributors.
"""Base classes of class-incremental distillation (``MODEL.KD.BASE_CLASSES``, added by
``masked_feature.py``): the checked ids and the logit indices the class terms keep."""
from typing import List, Optional, Sequence

from ..data.datasets import check_class_ids
from ..modeling.num_classes import num_classes

__all__ = ["base_class_indices", "config_base_classes"]


def config_base_classes(cfg) -> List[int]:
    """``MODEL.KD.BASE_CLASSES``, checked against the student's class count (may be empty).

    Raises:
        ValueError: repeated or out-of-range ids, naming the key and the class count.
    """
    base = cfg.MODEL.KD.get("BASE_CLASSES", [])
    return check_class_ids(base, num_classes(cfg), "MODEL.KD.BASE_CLASSES", owner="the student")


def base_class_indices(
    base_classes: Sequence[int], num_logits: int, num_classes: int
) -> Optional[List[int]]:
    """Logit indices the class term keeps: the base classes, plus the background (last) logit
    when ``num_logits`` is ``num_classes + 1`` (softmax); None (all) without base classes."""
    if not base_classes:
        return None
    if num_logits == num_classes:
        return list(base_classes)
    if num_logits == num_classes + 1:
        return list(base_classes) + [num_classes]
    raise ValueError(
        f"MODEL.KD.BASE_CLASSES: the class logits have {num_logits} entries, expected "
        f"{num_classes} (sigmoid) or {num_classes + 1} (softmax with background)."
    )
