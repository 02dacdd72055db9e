# Copyright (c) kd_detr contributors.
"""Copies of a bench's result files in a second folder (``kd_bench.py --publish DIR``).

A long bench outlives the sessions, shells or machines it runs in; its OUTPUT folder (checkpoints,
logs) may not. With ``--publish DIR`` every finished run refreshes copies of the result files in
DIR, e.g. a folder under version control: a bench stopped without warning still leaves the record
of every run it finished there, which a later bench takes over with ``--results-from
DIR/bench_results.json``.

Nothing recorded is lost: an existing ``DIR/bench_results.json`` is refreshed only when it is one
of the bench's ``--results-from`` files (checked before anything trains), and a refresh that would
drop a finished run of the file there (one this process does not know of) is refused with a
warning. Processes publishing into one DIR take turns (an exclusive lock on a file in the
temporary folder named after DIR's path, so nothing is added to DIR), so each refresh holds every
run finished when it was made.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time

from .arms import BenchError
from .run_lock import RunLock

__all__ = ["RESULT_FILES", "CURVE_FILES", "check_publish_target", "publish", "publish_lock"]

RESULT_FILES = ("bench_results.json", "bench_results.md", "bench_ap.png")
CURVE_FILES = ("bench_curves.json", "bench_curves.md", "bench_curves.png")


def check_publish_target(target, output, results_from=()):
    """Stop before anything trains when ``--publish`` would overwrite a record it does not keep.

    Raises:
        BenchError: ``target`` is the bench's own output folder, is a file, or holds a
            ``bench_results.json`` that is not among ``results_from``.
    """
    if not target:
        return
    if os.path.isfile(target):
        raise BenchError(f"--publish {target!r} is a file; give a folder")
    if os.path.realpath(target) == os.path.realpath(output):
        raise BenchError(f"--publish {target!r} is the bench's output folder; give another one "
                         "(e.g. a folder under docs/)")  # fmt: skip
    existing = os.path.join(target, RESULT_FILES[0])
    taken = {os.path.realpath(p) for p in results_from or []}
    if os.path.isfile(existing) and os.path.realpath(existing) not in taken:
        raise BenchError(
            f"--publish {target!r}: {existing} exists and is not a --results-from file, so "
            f"publishing would overwrite its runs; add --results-from {existing} (its finished "
            "runs are then kept) or publish into another folder"
        )


@contextlib.contextmanager
def publish_lock(target, poll_seconds=0.2):
    """Exclusive turn of this process on ``target``: the claim of :class:`~bench.run_lock.RunLock`
    on a file of the temporary folder named after ``target``'s path, waited for while another
    process holds it (a no-op without ``target``, or where claims are unsupported)."""
    if not target:
        yield
        return
    key = hashlib.sha1(os.path.realpath(target).encode()).hexdigest()[:16]
    lock = RunLock(os.path.join(tempfile.gettempdir(), f"kd_bench_publish-{key}"))
    while lock.acquire() is not None:
        time.sleep(poll_seconds)
    try:
        yield
    finally:
        lock.release()


def _finished_keys(result):
    """{(seed, config hash, teacher weights sha256 or None)} of the finished runs of a bench
    result: a KD run is the same record only with the same teacher."""
    sha = (result.get("teacher") or {}).get("weights_sha256")
    return {(r["seed"], r["hash"], sha if r.get("kd") else None)
            for r in result.get("runs", []) if r.get("bbox")}  # fmt: skip


def _recorded(path):
    """The bench result recorded in ``path`` ({} when there is none)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def publish(output, target, result, names=RESULT_FILES):
    """Copy ``names`` from ``output`` into ``target`` (each atomically), unless the
    ``bench_results.json`` there records finished runs that ``result`` does not (then nothing is
    copied, with a warning naming how many). Call it inside :func:`publish_lock`.

    Returns:
        bool: whether the files were copied.
    """
    os.makedirs(target, exist_ok=True)
    recorded = _recorded(os.path.join(target, RESULT_FILES[0]))
    dropped = _finished_keys(recorded) - _finished_keys(result)
    if dropped:
        print(f"[kd_bench] warning: not published to {target}: its {RESULT_FILES[0]} records "
              f"{len(dropped)} finished run(s) this bench does not have (other config or teacher); "
              "they are kept", flush=True)  # fmt: skip
        return False
    for name in names:
        source = os.path.join(output, name)
        if not os.path.isfile(source):
            continue
        destination = os.path.join(target, name)
        shutil.copyfile(source, destination + ".tmp")
        os.replace(destination + ".tmp", destination)
    print(f"[kd_bench] published {', '.join(names)} to {target}", flush=True)
    return True
