# Copyright (c) kd_detr contributors.
"""``--source hf``: a Hugging Face ``save_pretrained`` folder (model type from its config.json)."""
import inspect
from typing import Dict

import torch

from .hf_detr import read_hf_folder
from .registry import HF_CONVERTERS, register_checkpoint_converter

__all__ = ["convert_hf_folder"]


@register_checkpoint_converter("hf")
def convert_hf_folder(source: str, cfg, coco_classes: str = "auto") -> Dict[str, torch.Tensor]:
    """Hugging Face folder -> kd_detr state dict, after checking its config against ``cfg``.

    Hugging Face checkpoints already use contiguous labels (``id2label``), so ``coco_classes``
    is not used; the class count must equal ``MODEL.DETR.NUM_CLASSES``.
    """
    state_dict, config = read_hf_folder(source)
    model_type = config.get("model_type")
    if model_type not in HF_CONVERTERS:
        raise ValueError(
            f"Unsupported Hugging Face model type {model_type!r} in {source}/config.json; "
            f"supported: {sorted(HF_CONVERTERS)}"
        )
    convert, config_mismatches = HF_CONVERTERS[model_type]
    problems = config_mismatches(config, cfg)
    if problems:
        raise ValueError(
            f"{source} ({model_type}) does not match the kd_detr config:\n  - "
            + "\n  - ".join(problems)
        )
    if "cfg" in inspect.signature(convert).parameters:  # converters that depend on the config
        return convert(state_dict, config, cfg=cfg)
    return convert(state_dict, config)
