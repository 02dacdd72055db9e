# Copyright (c) kd_detr contributors.
"""Evaluators: COCO box AP with faster-coco-eval, base / novel / all AP of class-incremental
splits, ``EVALUATOR_REGISTRY`` and ``build_evaluator`` for ``TEST.EVALUATOR``."""
from .build import EVALUATOR_REGISTRY, build_evaluator
from .coco_evaluation import (
    BOX_STAT_NAMES,
    COCOBoxEvalResult,
    FastCOCOEvaluator,
    evaluate_coco_boxes,
    instances_to_coco_boxes,
    load_coco_gt,
    per_category_ap,
)
from .incremental import INCREMENTAL_GROUPS, COCOIncrementalEvaluator
