# Copyright (c) kd_detr contributors.
"""Checks of a run's config before anything is built or trained, so that a typo or a broken
dataset stops the run at once with one clear line instead of mid-training (or after it)."""
import difflib
import logging
import os
import tempfile
from typing import List

from detectron2.data import DatasetCatalog

from ..data import check_image_files
from ..evaluation import EVALUATOR_REGISTRY
from .setup import StartupError

__all__ = ["check_output_dir", "preflight_check"]

logger = logging.getLogger(__name__)


def _suggest(name: str, choices: List[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _check_solver(cfg) -> None:
    for key, value in (("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER), ("SOLVER.IMS_PER_BATCH",
                       cfg.SOLVER.IMS_PER_BATCH)):  # fmt: skip
        if value <= 0:
            raise StartupError(f"{key} is {value}: training needs a positive value.")


def check_output_dir(cfg) -> None:
    """OUTPUT_DIR exists or can be created, and can be written (StartupError otherwise)."""
    out = cfg.OUTPUT_DIR
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".kd_detr_write_test_"):
            pass
    except OSError as e:
        raise StartupError(
            f"OUTPUT_DIR {out!r} cannot be written ({type(e).__name__}: {e.strerror or e}): "
            "choose a folder you can write to (OUTPUT_DIR path/to/folder)."
        ) from e


def _check_names(cfg, eval_only: bool) -> None:
    registered = DatasetCatalog.list()
    keys = [("DATASETS.TEST", cfg.DATASETS.TEST)]
    if not eval_only:
        keys.insert(0, ("DATASETS.TRAIN", cfg.DATASETS.TRAIN))
    for key, names in keys:
        for name in names:
            if name not in registered:
                raise StartupError(
                    f"{key} names {name!r}, which is not a registered dataset."
                    f"{_suggest(name, registered)} Register it with DATASETS.COCO_JSON / "
                    "DATASETS.VOC (or in code) first."
                )
    evaluator = cfg.TEST.EVALUATOR
    if cfg.DATASETS.TEST and evaluator not in EVALUATOR_REGISTRY:
        names = EVALUATOR_REGISTRY.names()
        raise StartupError(
            f"TEST.EVALUATOR {evaluator!r} is not a registered evaluator; valid names: "
            f"{', '.join(sorted(names))}.{_suggest(evaluator, names)}"
        )


def _check_images(cfg, eval_only: bool) -> None:
    names = list(cfg.DATASETS.TEST) + ([] if eval_only else list(cfg.DATASETS.TRAIN))
    for name in dict.fromkeys(names):
        try:
            records = DatasetCatalog.get(name)
        except FileNotFoundError as e:
            raise StartupError(
                f"Dataset {name!r} cannot be loaded: {e}. Put its files where the registration "
                "points (builtin COCO / LVIS: under $DETECTRON2_DATASETS, default ./datasets) or "
                "register it from other files (DATASETS.COCO_JSON / DATASETS.VOC)."
            ) from e
        problems = check_image_files(records)
        if not problems:
            continue
        details = "\n  ".join(problems.lines())
        message = (
            f"Dataset {name!r} ({problems.total} images; {problems.checked_headers} headers "
            f"checked):\n  {details}\nFix the files or the annotations (tools/check_dataset.py "
            "lists every problem)"
        )
        if cfg.DATALOADER.ON_BAD_IMAGE == "skip" and name in cfg.DATASETS.TRAIN:
            logger.warning(message + "; DATALOADER.ON_BAD_IMAGE skip: training skips them.")
        else:
            hint = ", or set DATALOADER.ON_BAD_IMAGE skip to skip them in training."
            raise StartupError(message + hint)


def preflight_check(cfg, *, eval_only: bool = False) -> None:
    """Stop before any model is built when the run cannot succeed.

    Checks: positive ``SOLVER.MAX_ITER`` / ``IMS_PER_BATCH`` (training), a writable OUTPUT_DIR,
    registered ``DATASETS.TRAIN`` / ``TEST`` names and ``TEST.EVALUATOR`` (with close-match
    suggestions), and, with ``DATALOADER.CHECK_IMAGES``, the datasets' image files (every file
    exists; headers of up to 2,000 images per dataset match the annotated size).

    Raises:
        StartupError (a ValueError): one clear line (or a short list of files) naming the
        problem and the fix; train_net.py prints it without a traceback.
    """
    if not eval_only:
        _check_solver(cfg)
    check_output_dir(cfg)
    _check_names(cfg, eval_only)
    if cfg.DATALOADER.CHECK_IMAGES:
        _check_images(cfg, eval_only)
