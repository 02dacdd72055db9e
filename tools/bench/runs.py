# Copyright (c) kd_detr contributors.
"""Runs of a bench: resolved configs and their hashes, ``train_net.py`` subprocesses, finished-run
records (``bench_run.json``) and the teacher cache."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

__all__ = [
    "ROOT", "config_chain", "config_hash", "default_teacher_cache", "finished_run",
    "record_fields", "resolve_config", "schedule_opts", "train_run",
]  # fmt: skip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_RECORD = "bench_run.json"
_ITER = re.compile(r"\biter: (\d+)")


def schedule_opts(iters):
    """Overrides for a run of ``iters`` iterations: lr drop at 5/6, warmup min(50, iters), a
    checkpoint every tenth of the run (at least every 100 iterations apart) so that an
    interrupted run resumes from its last checkpoint."""
    if iters < 1:
        raise ValueError(f"iterations must be >= 1, got {iters}")
    drop = round(iters * 5 / 6)
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({drop},)" if 0 < drop < iters else "()",
        "SOLVER.WARMUP_ITERS", str(min(50, iters)),
        "SOLVER.CHECKPOINT_PERIOD", str(max(100, iters // 10)),
    ]  # fmt: skip


def _resumable(out_dir, command):
    """An interrupted run of the same command left a checkpoint in ``out_dir``."""
    try:
        with open(os.path.join(out_dir, "command.txt")) as f:
            same = f.read() == " ".join(command) + "\n"
    except OSError:
        return False
    return same and os.path.isfile(os.path.join(out_dir, "last_checkpoint"))


def _checkpoint_iteration(out_dir):
    """Iteration count of the checkpoint a resumed run starts from (Detectron2's
    ``model_0000299.pth`` holds 300 iterations; ``model_final.pth``: None)."""
    with open(os.path.join(out_dir, "last_checkpoint")) as f:
        name = f.read().strip()
    match = re.fullmatch(r"model_(\d+)\.pth", name)
    return int(match.group(1)) + 1 if match else None


def config_path(config_file):
    """``config_file`` as given if absolute, else relative to the repository root."""
    return config_file if os.path.isabs(config_file) else os.path.join(ROOT, config_file)


def config_chain(config_file):
    """Texts of ``config_file`` and of its ``_BASE_`` files, recursively (paths from ROOT)."""
    import yaml

    path = config_path(config_file)
    with open(path) as f:
        text = f.read()
    base = (yaml.safe_load(text) or {}).get("_BASE_")
    parents = []
    if base:
        parents = config_chain(os.path.join(os.path.dirname(path), base))
    return parents + [text]


def resolve_config(config_file, opts=()):
    """The config a run trains with (kd_detr's ``load_config``; registers its datasets)."""
    from kd_detr.config import load_config

    return load_config(config_path(config_file), opts=list(opts), freeze=False)


_DEFAULTS = {}  # kd_detr's default config, flat (filled once)


def _flat_items(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_hash(cfg, teacher_key=None):
    """Hash of the values of a resolved config that differ from kd_detr's defaults (without
    OUTPUT_DIR), with kd_detr's version: a config key added by later code, at its default, keeps
    the hash of every run (and cached teacher) the same. For a KD run the teacher checkpoint path
    is replaced by the teacher's own key (its resolved config)."""
    import kd_detr
    from kd_detr.config import load_config

    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    if teacher_key is not None:
        cfg.MODEL.KD.TEACHER.WEIGHTS = f"teacher:{teacher_key}"
    if not _DEFAULTS:
        _DEFAULTS.update(_flat_items(load_config(freeze=False, register_datasets=False)))
    defaults = _DEFAULTS
    changed = sorted(
        (key, repr(value))
        for key, value in _flat_items(cfg)
        if key not in defaults or defaults[key] != value
    )
    text = "\n".join(f"{key}={value}" for key, value in changed) + "\0" + kd_detr.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_teacher_cache():
    from kd_detr.utils import cache_root  # kd_detr only when a bench runs

    return cache_root("teachers")


def bbox(metrics):
    """The box metrics of a metrics_final.json content (its first dataset): AP, AP50, AP75 and
    every other finite number its evaluator reported (APs, per-class AP, the incremental
    evaluator's AP-base / AP-novel, ...)."""
    values = next(iter(metrics["results"].values()))["bbox"]
    out = {k: values[k] for k in ("AP", "AP50", "AP75")}
    out.update({k: v for k, v in values.items() if k not in out and isinstance(v, (int, float))
                and math.isfinite(v)})  # fmt: skip
    return out


RECORD_FIELDS = ("bbox", "seconds", "cpu_seconds", "resumed_at_iteration")


def record_fields(record):
    """What a run or teacher entry of a bench takes over from a run record (``bench_run.json``
    or an earlier bench's run): box metrics, seconds, CPU seconds (None: recorded before the
    bench measured them) and the iteration a resumed run resumed at."""
    record = record or {}
    return {k: record.get(k) for k in RECORD_FIELDS}


def finished_run(out_dir, expected_hash):
    """The record of a finished run in ``out_dir`` whose config hash is ``expected_hash``, else
    None (not run, interrupted, or run with another config)."""
    record = os.path.join(out_dir, RUN_RECORD)
    if not (os.path.isfile(record) and os.path.isfile(os.path.join(out_dir, "metrics_final.json"))):
        return None
    try:
        with open(record) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return content if content.get("hash") == expected_hash else None


def _progress(line, label, max_iter, tty):
    if not tty:
        return
    match = _ITER.search(line)
    if match:
        done = int(match.group(1)) + 1
        sys.stdout.write(f"\r    {label}: iteration {done}/{max_iter}   ")
        sys.stdout.flush()


def _wait_with_cpu_time(proc):
    """Wait for ``proc``; returns its exit code and the CPU seconds (user + system) it and the
    children it waited for used, None where ``os.wait4`` does not exist. On a shared machine
    this, not the wall-clock time, is what a run costs."""
    if not hasattr(os, "wait4"):
        return proc.wait(), None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, round(usage.ru_utime + usage.ru_stime, 1)


def train_run(python, config_file, out_dir, opts, *, label, run_hash, max_iter, record=None):
    """Train and evaluate one config with ``train_net.py`` in ``out_dir``: emptied first, unless
    an interrupted run of the same command left a checkpoint there, which is resumed
    (``--resume``).

    The subprocess's output goes to ``out_dir/log.txt`` (Detectron2's own log, written by
    ``default_setup``) and ``out_dir/stdout.log``. On success ``bench_run.json`` records the
    config hash, the box metrics, the seconds taken and the subprocess's CPU seconds.

    Returns:
        dict: the record.

    Raises:
        RuntimeError: train_net.py failed (names the log).
    """
    cmd = [python, "train_net.py", "--config-file", config_file, "OUTPUT_DIR", out_dir]
    cmd += list(opts)
    resume = _resumable(out_dir, cmd)
    if not resume:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "command.txt"), "w") as f:
            f.write(" ".join(cmd) + "\n")
    resumed_at = None
    if resume:
        resumed_at = _checkpoint_iteration(out_dir)
        print(f"    {label}: resuming at iteration {resumed_at} of {max_iter} from its checkpoint "
              "(Detectron2's resume restarts the data order and random state, so the weights "
              "differ from an uninterrupted run's)", flush=True)  # fmt: skip
    log_path = os.path.join(out_dir, "stdout.log" if not resume else "stdout_resumed.log")
    tty = sys.stdout.isatty()
    start = time.perf_counter()
    tail = []
    with open(log_path, "w") as log:
        run = cmd[:2] + ["--resume"] + cmd[2:] if resume else cmd
        proc = subprocess.Popen(
            run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-5:]
            _progress(line, label, max_iter, tty)
        rc, cpu_seconds = _wait_with_cpu_time(proc)
    if tty:
        sys.stdout.write("\r" + " " * 70 + "\r")
    if rc != 0:
        raise RuntimeError(
            f"{label} failed (exit code {rc}); see {log_path}. Last lines:\n" + "".join(tail)
        )
    with open(os.path.join(out_dir, "metrics_final.json")) as f:
        metrics = json.load(f)
    content = dict(record or {})
    content.update(
        hash=run_hash,
        bbox=bbox(metrics),
        seconds=round(time.perf_counter() - start, 1),
        cpu_seconds=cpu_seconds,
        train_and_eval_seconds=metrics.get("train_and_eval_seconds"),
    )
    if resumed_at is not None:  # "seconds" then covers the iterations from there on
        content["resumed_at_iteration"] = resumed_at
    with open(os.path.join(out_dir, RUN_RECORD), "w") as f:
        json.dump(content, f, indent=2)
    return content
