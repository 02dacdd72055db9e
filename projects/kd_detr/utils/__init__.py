# Copyright (c) kd_detr contributors.
"""The bottom layer: registries with chosen names and the data / cache path rules. Imports no
other kd_detr package."""
from .paths import SHARED_DATA_VAR, cache_root, expand_data_path, shared_data_root
from .registry import NamedRegistry

__all__ = ["NamedRegistry", "SHARED_DATA_VAR", "cache_root", "expand_data_path", "shared_data_root"]
