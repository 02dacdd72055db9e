# Copyright (c) kd_detr contributors.
"""Converters from third-party checkpoints to kd_detr state dicts."""
from . import (  # noqa: F401  (register)
    detrex,
    hf_source,
    official,
    official_deformable_detr,
    official_dino,
)
from .hf_d_fine import convert_hf_d_fine, hf_d_fine_config_mismatches
from .hf_dab_detr import convert_hf_dab_detr, hf_dab_detr_config_mismatches
from .hf_deformable_detr import (
    convert_hf_deformable_detr,
    hf_deformable_detr_config_mismatches,
)
from .hf_detr import (
    check_state_dict_keys,
    convert_hf_detr,
    hf_detr_config_mismatches,
    read_hf_folder,
)
from .hf_rt_detr import convert_hf_rt_detr, hf_rt_detr_config_mismatches
from .registry import CHECKPOINT_CONVERTERS, register_checkpoint_converter

# Hugging Face ``config.json`` model_type -> (state-dict converter, config-mismatch checker).
HF_CONVERTERS = {"detr": (convert_hf_detr, hf_detr_config_mismatches)}
HF_CONVERTERS["dab-detr"] = (convert_hf_dab_detr, hf_dab_detr_config_mismatches)
HF_CONVERTERS["deformable_detr"] = (
    convert_hf_deformable_detr,
    hf_deformable_detr_config_mismatches,
)
HF_CONVERTERS["rt_detr"] = (convert_hf_rt_detr, hf_rt_detr_config_mismatches)
HF_CONVERTERS["rt_detr_v2"] = (convert_hf_rt_detr, hf_rt_detr_config_mismatches)
HF_CONVERTERS["d_fine"] = (convert_hf_d_fine, hf_d_fine_config_mismatches)
