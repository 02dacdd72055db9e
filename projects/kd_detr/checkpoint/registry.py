# Copyright (c) kd_detr contributors.
"""Checkpoint converters by source name (``tools/convert_checkpoint.py --source NAME``)."""
from typing import Callable, Dict, Tuple

__all__ = [
    "CHECKPOINT_CONVERTERS",
    "HF_CONVERTERS",
    "register_checkpoint_converter",
    "register_hf_converter",
]

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


# Hugging Face ``config.json`` model_type -> (state-dict converter(state_dict, hf_config),
# config-mismatch checker(hf_config, cfg) -> list of problems), used by ``--source hf``.
HF_CONVERTERS: Dict[str, Tuple[Callable, Callable]] = {}


def register_hf_converter(model_type: str, config_mismatches: Callable):
    """Decorator registering the converter of one Hugging Face ``model_type`` together with its
    config checker; a model type can be registered once."""

    def register(fn: Callable) -> Callable:
        if model_type in HF_CONVERTERS:
            raise KeyError(f"Hugging Face converter {model_type!r} is already registered")
        HF_CONVERTERS[model_type] = (fn, config_mismatches)
        return fn

    return register
