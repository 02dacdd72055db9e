# Copyright (c) kd_detr contributors.
"""Evaluators: COCO box AP with faster-coco-eval, and ``build_evaluator`` for ``TEST.EVALUATOR``."""
from .coco_evaluation import (
    BOX_STAT_NAMES,
    COCOBoxEvalResult,
    FastCOCOEvaluator,
    evaluate_coco_boxes,
    instances_to_coco_boxes,
    load_coco_gt,
    per_category_ap,
)

# cfg.TEST.EVALUATOR name -> DatasetEvaluator class taking (dataset_name, output_dir=...).
EVALUATORS = {"coco": FastCOCOEvaluator}


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator named by ``cfg.TEST.EVALUATOR`` (default "coco") for one dataset.

    Args:
        cfg: a config with kd_detr's keys (``add_kd_detr_config``).
        dataset_name: registered dataset to evaluate on.
        output_folder: where the evaluator writes its files (None: nowhere).

    Raises:
        ValueError: for an unknown evaluator name.
    """
    name = cfg.TEST.get("EVALUATOR", "coco")
    if name == "coco_ovd" and name not in EVALUATORS:
        from ..ov.coco_ovd import COCOOVDEvaluator  # imports this package: import it lazily

        EVALUATORS[name] = COCOOVDEvaluator
    if name == "lvis" and name not in EVALUATORS:
        from ..ov.lvis_evaluation import LVISEvaluator  # imports this package: import it lazily

        EVALUATORS[name] = LVISEvaluator
    if name not in EVALUATORS:
        raise ValueError(
            f"Unknown cfg.TEST.EVALUATOR {name!r}; valid names: "
            f"{', '.join(sorted(set(EVALUATORS) | {'coco_ovd', 'lvis'}))}"
        )
    return EVALUATORS[name](dataset_name, output_dir=output_folder)
