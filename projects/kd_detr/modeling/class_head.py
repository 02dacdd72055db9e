# Copyright (c) kd_detr contributors.
"""``CLASS_HEAD_REGISTRY``: the class heads of DETR-family models (``MODEL.DETR.CLASS_HEAD``)."""
from typing import Callable

from torch import nn

from ..utils import NamedRegistry

__all__ = [
    "CLASS_HEAD_REGISTRY",
    "build_linear_class_head",
    "class_head_factory",
    "linear_class_head",
]

CLASS_HEAD_REGISTRY = NamedRegistry("CLASS_HEAD")
CLASS_HEAD_REGISTRY.__doc__ = """
Class heads of DETR-family models, selected by ``MODEL.DETR.CLASS_HEAD``: ``linear`` here;
``kd_detr.ov`` adds ``region_text`` (cosine similarity to class text embeddings).

Each entry is a function ``build(cfg, input_dim, num_classes, use_focal) -> nn.Module``. The
module maps query features (..., d) to logits (..., K): K = C for sigmoid (focal) models,
C + 1 with the "no object" logit last for softmax models. The model applies it to every decoder
layer (and deep-copies it for per-layer heads).
"""


def linear_class_head(input_dim: int, num_classes: int, use_focal: bool) -> nn.Module:
    """``nn.Linear(d, C)`` (focal) or ``nn.Linear(d, C + 1)`` (softmax)."""
    return nn.Linear(input_dim, num_classes + (0 if use_focal else 1))


@CLASS_HEAD_REGISTRY.register(name="linear")
def build_linear_class_head(cfg, input_dim: int, num_classes: int, use_focal: bool) -> nn.Module:
    """The default head, :func:`linear_class_head` (no config key)."""
    return linear_class_head(input_dim, num_classes, use_focal)


def class_head_factory(cfg) -> Callable[[int, int, bool], nn.Module]:
    """``make(input_dim, num_classes, use_focal)`` building the ``MODEL.DETR.CLASS_HEAD`` head of
    ``cfg``; the model calls it in ``__init__`` (so parameters are created in a fixed order).

    Raises:
        ValueError: for an unregistered head name, listing the registered ones.
    """
    name = cfg.MODEL.DETR.CLASS_HEAD
    if name not in CLASS_HEAD_REGISTRY:
        raise ValueError(
            f"Unknown MODEL.DETR.CLASS_HEAD {name!r}; registered: "
            f"{', '.join(CLASS_HEAD_REGISTRY.names())}"
        )
    build = CLASS_HEAD_REGISTRY.get(name)

    def make(input_dim: int, num_classes: int, use_focal: bool) -> nn.Module:
        return build(cfg, input_dim, num_classes, use_focal)

    return make
