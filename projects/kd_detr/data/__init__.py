# Copyright (c) kd_detr contributors.
"""Data: dataset registration (importing this package registers the built-in demo datasets and
the config-driven dataset sources), training loaders chosen by the config."""
from . import datasets
from .build import TRAIN_LOADER_REGISTRY, build_train_loader
from .datasets import *
from .detr_augmentation import build_detr_train_augmentation
