# Copyright (c) kd_detr contributors.
"""Models; importing registers kd_detr's backbones with Detectron2."""
from . import backbone
