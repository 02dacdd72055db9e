# Copyright (c) kd_detr contributors.
"""Knowledge distillation building blocks: KD loss registry and terms, distillation points,
foreground weights, baseline pairings, class mapping and the frozen teacher. Importing registers
the KD losses."""
from .baselines import inconsistent_pairs, similar_foreground_pairs, similar_general_pairs
from .class_mapping import build_class_mapping, map_teacher_logits
from .config import add_kd_config
from .losses import (
    KD_MODES,
    KDDETRLoss,
    all_reduce_sum,
    final_layer_targets,
    kd_detr_losses,
    sigmoid_kl,
    softmax_kl,
)
from .points import DISTRIBUTIONS, DistillationPointSampler, specific_points
from .registry import KD_LOSS_REGISTRY, build_kd_losses
from .teacher import (
    Teacher,
    build_teacher,
    init_student_from_teacher,
    load_teacher_weights,
    teacher_class_index,
)
from .weights import foreground_weights, sigmoid_foreground_weights, softmax_foreground_weights
