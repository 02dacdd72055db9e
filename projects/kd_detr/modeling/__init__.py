# Copyright (c) kd_detr contributors.
"""Models; importing registers kd_detr's config keys, backbones, class heads and
meta-architectures with Detectron2 / kd_detr registries."""
from . import backbone, class_head, config, meta_arch  # noqa: F401  (registration side effects)
from .class_head import CLASS_HEAD_REGISTRY, class_head_factory, linear_class_head
