# Copyright (c) kd_detr contributors.
"""Start-up of a run (``train_net.setup``): kd_detr's log records in Detectron2's handlers and
``log.txt``, the device and batch-size checks, and the solver values as run."""
import contextlib
import logging

import torch

from detectron2.engine import DefaultTrainer
from detectron2.utils import comm

__all__ = [
    "StartupError",
    "check_batch_size",
    "check_device",
    "check_schedule",
    "hold_kd_detr_logs",
    "setup_kd_detr_logger",
    "solver_as_run",
]

logger = logging.getLogger(__name__)

SOLVER_KEYS = ("IMS_PER_BATCH", "BASE_LR", "MAX_ITER", "STEPS", "WARMUP_ITERS")


class StartupError(ValueError):
    """A config that cannot run here; the message is one line naming the problem and the fix."""


class _HeldRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def hold_kd_detr_logs():
    """Hold the ``kd_detr`` log records emitted inside the block (loading the config, before
    ``OUTPUT_DIR`` and the log handlers exist); :func:`setup_kd_detr_logger` replays them into
    ``log.txt`` with their original time. On an error they are printed as usual."""
    root = logging.getLogger("kd_detr")
    held = _HeldRecords()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(held)
    try:
        yield held.records
    except BaseException:
        root.removeHandler(held)
        root.setLevel(level)
        for record in held.records:
            if record.levelno >= logging.WARNING:
                root.handle(record)
        raise
    root.removeHandler(held)


def setup_kd_detr_logger(held_records=()):
    """Send the ``kd_detr`` logger (every ``kd_detr.*`` module) to the handlers Detectron2's
    ``default_setup`` gave the ``detectron2`` logger (console on the main process,
    ``OUTPUT_DIR/log.txt`` or ``log.txt.rank<N>``), with the same timestamped format; then replay
    ``held_records`` (from :func:`hold_kd_detr_logs`). Call after ``default_setup``; calling it
    again (a second run in one process) replaces the handlers."""
    root = logging.getLogger("kd_detr")
    root.setLevel(logging.DEBUG)
    for handler in [h for h in root.handlers if getattr(h, "_kd_detr_shared", False)]:
        root.removeHandler(handler)
    for handler in logging.getLogger("detectron2").handlers:
        # The same handler objects (not copies): one stream per log.txt, one console. Marked by
        # an attribute set on our side so that a later call removes only what it added.
        wrapper = _SharedHandler(handler)
        root.addHandler(wrapper)
    # Propagation stays on, so records also reach handlers a caller put on the root logger
    # (pytest's caplog, a script's basicConfig); a bare command has none there.
    for record in held_records:
        root.handle(record)
    return root


class _SharedHandler(logging.Handler):
    """Forwards to one of the ``detectron2`` logger's handlers (its level and formatter)."""

    _kd_detr_shared = True

    def __init__(self, target):
        super().__init__(target.level)
        self.target = target

    def emit(self, record):
        self.target.handle(record)


def check_device(cfg):
    """Stop at start-up when ``MODEL.DEVICE`` asks for CUDA on a machine without a CUDA GPU
    (``MODEL.DEVICE auto`` was already resolved by ``load_config``)."""
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StartupError(
            f"MODEL.DEVICE is '{device}' but no CUDA GPU is available on this machine: add "
            "`MODEL.DEVICE cpu` to the command (or `MODEL.DEVICE auto`: the GPU when there is "
            "one, else the CPU)."
        )


def check_batch_size(cfg, world_size):
    """Detectron2 rescales batch, lr and schedule when ``world_size`` differs from
    ``SOLVER.REFERENCE_WORLD_SIZE`` and then needs ``IMS_PER_BATCH`` to be a multiple of it (else
    a bare ``AssertionError: Invalid REFERENCE_WORLD_SIZE in config!``); say so in one line."""
    reference, batch = cfg.SOLVER.REFERENCE_WORLD_SIZE, cfg.SOLVER.IMS_PER_BATCH
    if reference in (0, world_size) or batch % reference == 0:
        return
    raise StartupError(
        f"SOLVER.IMS_PER_BATCH {batch} is not a multiple of SOLVER.REFERENCE_WORLD_SIZE "
        f"{reference} (the recipe's process count, used to rescale batch, lr and schedule to "
        f"the {world_size} process(es) of this run): add `SOLVER.REFERENCE_WORLD_SIZE 0` to "
        f"train with exactly {batch} images per iteration and the configured lr and schedule, "
        f"or use a multiple of {reference}."
    )


def check_schedule(cfg, world_size):
    """A step of ``SOLVER.STEPS`` equal to ``SOLVER.MAX_ITER`` as run (after the rescaling of
    :func:`check_batch_size`) fails deep in fvcore ("Milestone must be smaller than total number
    of updates"); say which values collide and what to change."""
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    scale = 1.0 if reference in (0, world_size) else world_size / reference
    max_iter = int(round(cfg.SOLVER.MAX_ITER / scale))
    for step in cfg.SOLVER.STEPS:
        if int(round(step / scale)) == max_iter:
            rescaled = (
                ""
                if scale == 1.0
                else f" (SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} and step {step} both become "
                f"{max_iter} on {world_size} process(es), SOLVER.REFERENCE_WORLD_SIZE {reference})"
            )
            raise StartupError(
                f"SOLVER.STEPS {tuple(cfg.SOLVER.STEPS)} has a step equal to SOLVER.MAX_ITER "
                f"{max_iter}{rescaled}: every step must be below SOLVER.MAX_ITER; lower or drop "
                "it (SOLVER.STEPS \"()\" for a constant lr)."
            )


def _solver_values(cfg):
    return {
        key: list(cfg.SOLVER[key]) if key == "STEPS" else cfg.SOLVER[key] for key in SOLVER_KEYS
    }


def solver_as_run(cfg, run_cfg=None):
    """``{"configured": {...}, "as_run": {...}, "reference_world_size", "world_size"}`` of
    ``SOLVER.{IMS_PER_BATCH, BASE_LR, MAX_ITER, STEPS, WARMUP_ITERS}``; ``run_cfg`` is the
    trainer's config (after Detectron2's ``auto_scale_workers``), computed from ``cfg`` if not
    given. Logs both in one line."""
    world_size = comm.get_world_size()
    if run_cfg is None:
        run_cfg = DefaultTrainer.auto_scale_workers(cfg, world_size)
    configured, as_run = _solver_values(cfg), _solver_values(run_cfg)
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if configured == as_run:
        how = f"as configured (SOLVER.REFERENCE_WORLD_SIZE {reference}, {world_size} process(es))"
        values = ", ".join(f"{k} {v}" for k, v in as_run.items())
    else:
        how = (
            f"rescaled from SOLVER.REFERENCE_WORLD_SIZE {reference} to {world_size} process(es); "
            "`SOLVER.REFERENCE_WORLD_SIZE 0` keeps the configured values"
        )
        values = ", ".join(
            f"{k} {configured[k]} -> {as_run[k]}" if configured[k] != as_run[k] else f"{k} {v}"
            for k, v in as_run.items()
        )
    logger.info(f"Solver {how}: {values}")
    return {
        "configured": configured,
        "as_run": as_run,
        "reference_world_size": reference,
        "world_size": world_size,
    }
