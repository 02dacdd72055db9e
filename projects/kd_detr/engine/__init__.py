# Copyright (c) kd_detr contributors.
from .launch import launch
from .trainer import Trainer, validate_num_classes, write_metrics_json
