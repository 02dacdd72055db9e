# Copyright (c) kd_detr contributors.
"""Converters from third-party checkpoints to kd_detr state dicts."""
from . import (  # noqa: F401  (register)
    detrex,
    ema_teacher,
    hf_source,
    official,
    official_d_fine,
    official_deformable_detr,
    official_dino,
    official_rt_detr,
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
from .load_policy import HEAD_KEY_PATTERNS, loaded_keys, resume_load_policy, weights_load_policy
from .registry import (
    CHECKPOINT_CONVERTERS,
    HF_CONVERTERS,
    register_checkpoint_converter,
    register_hf_converter,
)
from .safe_checkpointer import (
    SafeCheckpointer,
    atomic_torch_save,
    atomic_write_text,
    is_readable_checkpoint,
)
