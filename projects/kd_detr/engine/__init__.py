# Copyright (c) kd_detr contributors.
from .kd_hooks import DistillationPointsHook, KDWeightSchedule, TeacherSanityHook
from .kd_trainer import KDAMPTrainer, KDSimpleTrainer, KDStepMixin, KDTrainer
from .launch import launch
from .trainer import Trainer, write_metrics_json
