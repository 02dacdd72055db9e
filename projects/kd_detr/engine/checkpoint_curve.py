# Copyright (c) kd_detr contributors.
"""A learning curve from the checkpoints a run already wrote: every periodic checkpoint of an
OUTPUT_DIR (``model_0000119.pth``, ...) evaluated on the run's test sets, the results cached in
``OUTPUT_DIR/checkpoint_metrics.json`` so that a later call evaluates only new checkpoints.

One number at the end of a schedule says little when a model is still taking off (a difference
of a few AP between two runs may be where each happened to stop); the curve shows whether it
holds over the last part of training. The run's own ``inference/`` folder is never touched: each
evaluation writes into a temporary folder.
"""
import hashlib
import json
import logging
import os
import re
import tempfile
import time

from .checkpointing import load_for_evaluation
from .trainer import Trainer, json_safe

__all__ = ["CURVE_FILE", "evaluate_checkpoints", "list_checkpoints"]

logger = logging.getLogger(__name__)

CURVE_FILE = "checkpoint_metrics.json"
_PERIODIC = re.compile(r"model_(\d{7})\.pth")


def list_checkpoints(output_dir, max_iter=None):
    """The checkpoints of ``output_dir`` as ``[(iterations done, file name)]``, sorted.

    ``model_0000119.pth`` holds 120 iterations. ``model_final.pth`` counts as ``max_iter``
    iterations and is left out when the periodic checkpoint of that iteration exists (Detectron2
    writes both at the end of training, with the same weights) or when ``max_iter`` is None.
    """
    found = {}
    for name in sorted(os.listdir(output_dir)):
        match = _PERIODIC.fullmatch(name)
        if match:
            found[int(match.group(1)) + 1] = name
    final = os.path.join(output_dir, "model_final.pth")
    if max_iter and os.path.isfile(final) and max_iter not in found:
        found[int(max_iter)] = "model_final.pth"
    return sorted(found.items())


def _evaluation_key(cfg):
    """Hash of everything an evaluation depends on besides the weights: the config with
    OUTPUT_DIR and MODEL.WEIGHTS blanked (a changed test set, image size or model re-evaluates)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS = "", ""
    return hashlib.sha256(cfg.dump().encode()).hexdigest()[:16]


def _file_stamp(path):
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_cache(output_dir, key):
    """Cached evaluations still valid: same settings, the checkpoint file unchanged."""
    try:
        with open(os.path.join(output_dir, CURVE_FILE)) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    if cache.get("evaluation_key") != key:
        return {}  # evaluated under other settings: start over
    valid = {}
    for entry in cache.get("checkpoints", []):
        path = os.path.join(output_dir, entry.get("file", ""))
        if os.path.isfile(path) and all(entry.get(k) == v for k, v in _file_stamp(path).items()):
            valid[entry["file"]] = entry
    return valid


def _write_atomically(path, payload):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(json_safe(payload), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _as_nested(cfg, results):
    """``{dataset: {task: {metric: value}}}`` (``Trainer.test`` unwraps a single dataset)."""
    results = dict(results or {})
    if len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
        results = {cfg.DATASETS.TEST[0]: results}
    return results


def evaluate_checkpoints(cfg, output_dir=None, every=1, force=False):
    """Evaluate the checkpoints of ``output_dir`` (default ``cfg.OUTPUT_DIR``) with ``cfg``.

    Args:
        cfg (CfgNode): the run's config (e.g. ``load_config(OUTPUT_DIR/config.yaml)``): its
            model, ``DATASETS.TEST`` and test-time settings; ``SOLVER.MAX_ITER`` places
            ``model_final.pth``.
        every (int): evaluate every ``every``-th checkpoint, counted from the last one (which is
            always evaluated).
        force (bool): evaluate again checkpoints already in the cache.

    Returns:
        dict: ``{"output_dir", "evaluation_key", "checkpoints": [{"file", "iteration",
        "results": {dataset: {task: {metric: value}}}, "seconds", "size", "mtime_ns"}]}``,
        sorted by iteration (with valid cached checkpoints ``every`` skipped); also written to
        ``output_dir/checkpoint_metrics.json`` after each evaluation (atomically), so an
        interrupted call keeps what it finished.

    Raises:
        ValueError: ``output_dir`` holds no checkpoint, or ``every`` < 1.
    """
    output_dir = os.path.abspath(output_dir or cfg.OUTPUT_DIR)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    checkpoints = list_checkpoints(output_dir, cfg.SOLVER.MAX_ITER)
    if not checkpoints:
        raise ValueError(
            f"no checkpoint (model_NNNNNNN.pth or model_final.pth) in {output_dir}: train with "
            "SOLVER.CHECKPOINT_PERIOD below SOLVER.MAX_ITER to get a curve"
        )
    checkpoints = checkpoints[::-1][::every][::-1]
    key = _evaluation_key(cfg)
    cache_path = os.path.join(output_dir, CURVE_FILE)
    cache = {} if force else _read_cache(output_dir, key)
    done, todo = {}, []
    for iteration, name in checkpoints:
        entry = cache.get(name)
        if entry and entry.get("iteration") == iteration:
            done[name] = entry
        else:
            todo.append((iteration, name, _file_stamp(os.path.join(output_dir, name))))
    logger.info(
        f"{output_dir}: {len(checkpoints)} checkpoint(s), {len(done)} evaluated before, "
        f"{len(todo)} to evaluate"
    )
    model = Trainer.build_model(cfg) if todo else None
    start = time.perf_counter()
    for i, (iteration, name, stamp) in enumerate(todo):
        tick = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kd_detr_curve_") as tmp:
            eval_cfg = cfg.clone()
            eval_cfg.defrost()
            eval_cfg.OUTPUT_DIR = tmp
            eval_cfg.MODEL.WEIGHTS = os.path.join(output_dir, name)
            eval_cfg.freeze()
            load_for_evaluation(eval_cfg, model)
            results = _as_nested(eval_cfg, Trainer.test(eval_cfg, model))
        seconds = time.perf_counter() - tick
        done[name] = {"file": name, "iteration": iteration, "results": json_safe(results),
                      "seconds": round(seconds, 1), **stamp}  # fmt: skip
        _write_atomically(cache_path, _payload(output_dir, key, cache, done))
        eta = (time.perf_counter() - start) / (i + 1) * (len(todo) - i - 1)
        logger.info(
            f"[{i + 1}/{len(todo)}] {name} (iteration {iteration}): {_headline(results)} "
            f"({seconds:.1f} s, ETA {eta:.0f} s)"
        )
    payload = _payload(output_dir, key, cache, done)
    if not todo and not os.path.isfile(cache_path):
        _write_atomically(cache_path, payload)
    return payload


def _payload(output_dir, key, cache, done):
    """The cache file's content: this call's checkpoints, plus valid cached ones it did not
    select (``every`` > 1 keeps what an earlier call evaluated)."""
    entries = {**cache, **done}
    return {
        "output_dir": output_dir,
        "evaluation_key": key,
        "checkpoints": sorted(entries.values(), key=lambda c: c["iteration"]),
    }


def _headline(results):
    """``AP 12.3 AP50 36.8`` of the first dataset's first task, for the log."""
    for tasks in results.values():
        for metrics in tasks.values():
            return " ".join(
                f"{k} {metrics[k]:.1f}" for k in ("AP", "AP50") if metrics.get(k) is not None
            )
    return "no results"
