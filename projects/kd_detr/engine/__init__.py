# Copyright (c) kd_detr contributors.
from .kd_hooks import DistillationPointsHook, KDWeightSchedule, TeacherSanityHook
from .kd_trainer import KDAMPTrainer, KDSimpleTrainer, KDStepMixin, KDTrainer
from .launch import launch
from .trainer import Trainer, validate_num_classes, write_metrics_json
