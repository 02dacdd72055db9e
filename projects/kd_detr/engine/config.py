# Copyright (c) kd_detr contributors.
"""Config keys of the engine: optimizer options and where the final metrics are written."""
from ..config import CONFIG_EXTENSION_REGISTRY

__all__ = ["add_engine_config"]


@CONFIG_EXTENSION_REGISTRY.register(name="engine")
def add_engine_config(cfg):
    """Add ``SOLVER.{OPTIMIZER, BACKBONE_MULTIPLIER, LR_MULTIPLIERS}`` and ``TEST.METRICS_JSON``."""
    # "SGD" (Detectron2's default) or "ADAMW" (DETR-family recipes).
    cfg.SOLVER.OPTIMIZER = "SGD"
    # lr multiplier of parameters under "backbone." (DETR recipes: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # Further lr multipliers, "name_substring:factor" (e.g. "sampling_offsets:0.1"); factors of
    # every matching entry multiply.
    cfg.SOLVER.LR_MULTIPLIERS = []
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model": clip the norm of all gradients
    # together to CLIP_VALUE (DETR recipes), besides Detectron2's per-parameter "value" / "norm".
    # Where train_net.py writes the final metrics JSON ("" = OUTPUT_DIR/metrics_final.json).
    cfg.TEST.METRICS_JSON = ""
