# Copyright (c) kd_detr contributors.
"""Models; importing registers kd_detr's backbones with Detectron2."""
from . import backbone
from . import meta_arch  # noqa: F401  (registers DETR / DABDETR in META_ARCH_REGISTRY)
