# Copyright (c) kd_detr contributors.
"""Checkpoint converters by source name (``tools/convert_checkpoint.py --source NAME``)."""
from typing import Callable, Dict

__all__ = ["CHECKPOINT_CONVERTERS", "register_checkpoint_converter"]

# Source name -> converter(source, cfg, coco_classes="auto") -> kd_detr state dict, where source
# is what the user passes as INPUT (a file or folder path; converters of files also accept an
# in-memory state dict) and cfg is the frozen config of the target model.
CHECKPOINT_CONVERTERS: Dict[str, Callable] = {}


def register_checkpoint_converter(name: str):
    """Decorator registering a converter under ``name``; a name can be registered once."""

    def register(fn: Callable) -> Callable:
        if name in CHECKPOINT_CONVERTERS:
            raise KeyError(f"checkpoint converter {name!r} is already registered")
        CHECKPOINT_CONVERTERS[name] = fn
        return fn

    return register
