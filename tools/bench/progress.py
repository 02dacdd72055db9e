# Copyright (c) kd_detr contributors.
"""How long a bench still takes: a run's estimate from the runs finished so far and the bench's
ETA over the processes sharing it."""
from .report import duration
from .run_lock import RunLock
from .runs import finished_run

__all__ = ["bench_eta", "run_estimate"]

_DONE = ("finished", "imported", "trained")


def run_estimate(runs, run):
    """Mean seconds of the finished runs of ``run``'s arm, else of all finished runs (None
    before any run finished). Resumed runs are left out: their seconds cover a part."""
    whole = [r for r in runs if r.get("seconds") and not r.get("resumed_at_iteration")]
    done = [r["seconds"] for r in whole if r["arm"] == run["arm"]]
    done = done or [r["seconds"] for r in whole]
    return sum(done) / len(done) if done else None


def bench_eta(runs, run):
    """"~25m00s, bench ETA 3h10m with 2 processes training": ``run``'s estimate, and the
    estimates of every run not finished yet (by any process, ``run`` included) over the
    processes training now: this one and those holding claims on other runs."""
    left = [r for r in runs if r.get("state") not in _DONE
            and not finished_run(r["out_dir"], r["hash"])]  # fmt: skip
    estimates = [run_estimate(runs, r) for r in left]
    if not estimates or None in estimates:
        return "run time and bench ETA known after the first run"
    workers = 1 + sum(1 for r in left if r is not run and RunLock(r["out_dir"]).held_by())
    eta = duration(sum(estimates) / workers)
    return f"~{duration(run_estimate(runs, run))}, bench ETA {eta}" + (
        f" with {workers} processes training" if workers > 1 else "")  # fmt: skip
