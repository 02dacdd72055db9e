# Copyright (c) kd_detr contributors.
"""Config keys of the evaluation layer."""

__all__ = ["add_evaluation_config"]


def add_evaluation_config(cfg):
    """Add ``TEST.EVALUATOR`` in place."""
    # "coco": faster-coco-eval based COCO box AP with a per-class table.
    # "coco_incremental": COCO box AP plus AP / AP50 of the base, novel and all classes of a
    # DATASETS.INCREMENTAL split (evaluate its <NAME>_val).
    # "lvis": LVIS box AP with APr / APc / APf, top 300 detections per image (kd_detr.ov).
    cfg.TEST.EVALUATOR = "coco"
