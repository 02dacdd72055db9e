# Copyright (c) kd_detr contributors.
"""What the trainers load and where they may write: the OUTPUT_DIR guard of fresh runs, the load
policies of ``MODEL.WEIGHTS`` / ``--resume`` / ``--eval-only``, and ``SafeCheckpointer`` in place
of Detectron2's checkpointer inside ``DefaultTrainer``."""
import contextlib
import os

from detectron2.engine import defaults as d2_defaults

from ..checkpoint import SafeCheckpointer, resume_load_policy, weights_load_policy

__all__ = [
    "check_output_dir_is_free",
    "load_for_evaluation",
    "safe_checkpointer_in_default_trainer",
]


@contextlib.contextmanager
def safe_checkpointer_in_default_trainer():
    """Within the block, ``DefaultTrainer.__init__`` builds a :class:`SafeCheckpointer` (atomic
    saves, fallback to the last readable checkpoint) instead of ``DetectionCheckpointer``."""
    saved = d2_defaults.DetectionCheckpointer
    d2_defaults.DetectionCheckpointer = SafeCheckpointer
    try:
        yield
    finally:
        d2_defaults.DetectionCheckpointer = saved


def check_output_dir_is_free(cfg) -> None:
    """A fresh run (no ``--resume``) must not overwrite the checkpoints of another run.

    Raises:
        FileExistsError: OUTPUT_DIR holds ``last_checkpoint`` or ``model_*.pth`` files and
            ``OVERWRITE_OUTPUT_DIR`` is False, naming the folder and the ways on.
    """
    out = cfg.OUTPUT_DIR
    if cfg.OVERWRITE_OUTPUT_DIR or not out or not os.path.isdir(out):
        return
    found = sorted(
        n
        for n in os.listdir(out)
        if n == "last_checkpoint" or (n.startswith("model_") and n.endswith(".pth"))
    )
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise FileExistsError(
            f"OUTPUT_DIR {out!r} already holds checkpoints ({shown}) and this run would overwrite "
            "them. Continue that run with --resume, choose another OUTPUT_DIR, or set "
            "OVERWRITE_OUTPUT_DIR True to replace them."
        )


def load_for_evaluation(cfg, model, resume: bool = False) -> None:
    """Load the weights ``--eval-only`` evaluates: the last checkpoint of OUTPUT_DIR with
    ``resume``, else ``MODEL.WEIGHTS``, every entry of the model filled (see
    ``MODEL.WEIGHTS_MIN_LOADED_PERCENT``).

    Raises:
        ValueError: no weights are given, or they do not fill the model.
    """
    checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    min_loaded = cfg.MODEL.WEIGHTS_MIN_LOADED_PERCENT / 100.0
    if resume and checkpointer.has_checkpoint():
        checkpointer.load_policy = resume_load_policy(model, cfg.OUTPUT_DIR)
    elif not cfg.MODEL.WEIGHTS and min_loaded != 0:
        raise ValueError(
            "--eval-only needs trained weights: set MODEL.WEIGHTS path/to/model_final.pth (or "
            "MODEL.WEIGHTS_MIN_LOADED_PERCENT 0 to evaluate the initialisation on purpose)."
        )
    else:
        checkpointer.load_policy = weights_load_policy(model, min_loaded=min_loaded, eval_only=True)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
