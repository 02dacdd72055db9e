# Copyright (c) kd_detr contributors.
"""Data: dataset registration (importing this package registers the built-in demo datasets and
the config-driven dataset sources), training loaders chosen by the config."""
from . import datasets
from .bad_images import BadImagePolicy
from .build import TRAIN_MAPPER_REGISTRY, build_test_loader, build_train_loader, build_train_mapper
from .datasets import *
from .detr_augmentation import build_detr_train_augmentation
from .image_check import ImageProblems, check_image_files
