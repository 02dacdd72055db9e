# Copyright (c) kd_detr contributors.
"""Config keys of the evaluation layer."""

__all__ = ["add_evaluation_config"]


def add_evaluation_config(cfg):
    """Add ``TEST.EVALUATOR`` in place."""
    # "coco": faster-coco-eval based COCO box AP with a per-class table.
    # "lvis": LVIS box AP with APr / APc / APf, top 300 detections per image (kd_detr.ov).
    cfg.TEST.EVALUATOR = "coco"
