# Copyright (c) kd_detr contributors.
"""The top layer: Detectron2 trainers (plain and KD), their hooks, optimizer and ``launch``."""
from . import config  # noqa: F401  (registers the engine's config keys)
from .checkpoint_curve import evaluate_checkpoints, list_checkpoints
from .checkpointing import check_output_dir_is_free, load_for_evaluation
from .kd_hooks import DistillationPointsHook, KDWeightSchedule, TeacherSanityHook
from .kd_trainer import KDAMPTrainer, KDSimpleTrainer, KDStepMixin, KDTrainer, unwrap
from .launch import launch
from .preflight import check_output_dir, preflight_check
from .trainer import Trainer, write_metrics_json
