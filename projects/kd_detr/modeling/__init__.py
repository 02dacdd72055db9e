# Copyright (c) kd_detr contributors.
"""Models; importing registers kd_detr's backbones and meta-architectures with Detectron2."""
from . import backbone, meta_arch  # noqa: F401  (registration side effects)
