# Copyright (c) kd_detr contributors.
"""Config keys of the engine: optimizer options, what a run may load and overwrite, and where the
final metrics are written."""
from ..config import CONFIG_EXTENSION_REGISTRY

__all__ = ["add_engine_config"]


@CONFIG_EXTENSION_REGISTRY.register(name="engine")
def add_engine_config(cfg):
    """Add ``SOLVER.{OPTIMIZER, BACKBONE_MULTIPLIER, LR_MULTIPLIERS}``, ``OVERWRITE_OUTPUT_DIR``,
    ``MODEL.WEIGHTS_MIN_LOADED_PERCENT`` and ``TEST.METRICS_JSON``."""
    # "SGD" (Detectron2's default) or "ADAMW" (DETR-family recipes).
    cfg.SOLVER.OPTIMIZER = "SGD"
    # lr multiplier of parameters under "backbone." (DETR recipes: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # Further lr multipliers, "name_substring:factor" (e.g. "sampling_offsets:0.1"); factors of
    # every matching entry multiply.
    cfg.SOLVER.LR_MULTIPLIERS = []
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model": clip the norm of all gradients
    # together to CLIP_VALUE (DETR recipes), besides Detectron2's per-parameter "value" / "norm".

    # A fresh run (no --resume) into an OUTPUT_DIR holding checkpoints stops with an error unless
    # this is True (then the old checkpoints are overwritten).
    cfg.OVERWRITE_OUTPUT_DIR = False
    # Percentage (0..100) of the model's state-dict entries that MODEL.WEIGHTS must fill; < 0:
    # the default rule (training: a pretrained backbone, or every non-head entry of a detector
    # checkpoint; --eval-only: every entry). 0 accepts anything, e.g. evaluating an
    # initialisation on purpose.
    cfg.MODEL.WEIGHTS_MIN_LOADED_PERCENT = -1
    # Where train_net.py writes the final metrics JSON ("" = OUTPUT_DIR/metrics_final.json).
    cfg.TEST.METRICS_JSON = ""
