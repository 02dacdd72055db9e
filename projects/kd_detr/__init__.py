# Copyright (c) kd_detr contributors.
"""kd_detr: knowledge distillation for DETR-family detectors on Detectron2.

Importing the package registers its datasets, backbones and meta-architectures.
"""
from . import data, modeling  # noqa: F401  (registers datasets, backbones, models)
from .config import add_kd_detr_config

__version__ = "0.1.0"
