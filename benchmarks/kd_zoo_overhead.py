#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Step time and memory of every KD method of the zoo, relative to the student trained alone.

The student step (DAB-DETR R18, no KD) is measured once, then one KD step per method with its
COCO recipe (``configs/kd_zoo/<method>_dab_detr_R_18_from_R_50_50ep_coco.yaml``; KD-DETR's own
recipe for ``kd_detr``), each configuration in its own process by ``benchmarks/kd_overhead.py``'s
worker (random weights, a batch of 2 random images with 3 boxes, the R50 teacher randomly
initialised, masked group decoding):

  time_ratio   = KD step of the method / student step (medians over --steps)
  memory_ratio = peak RSS growth of the KD step / that of the student step

Usage: python benchmarks/kd_zoo_overhead.py [--methods NAME ...] [--steps 5] [--warmup 2]
           [--threads N] [--size 512] [--json FILE]
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kd_overhead import KD_CONFIG, ROOT, run_worker, save_teacher  # noqa: E402

# Method -> its DAB-DETR R50 -> R18 recipe (every method at its paper defaults).
METHODS = {
    "kd_detr": KD_CONFIG,
    **{
        name: f"configs/kd_zoo/{name}_dab_detr_R_18_from_R_50_50ep_coco.yaml"
        for name in ("dkd", "mlkd", "ctkd", "fitnet", "fgd", "mgd", "kdep", "detrdistill", "qskd",
                     "d3etr")  # fmt: skip
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to measure (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--json", default="", help="also write all measurements here")
    return parser.parse_args(argv)


def _worker_args(args, kd_config):
    """The options kd_overhead's worker reads, for one method's recipe."""
    return argparse.Namespace(
        steps=args.steps, warmup=args.warmup, threads=args.threads, size=args.size,
        group_checkpoint=False, losses=None, opts=[], kd_config=kd_config,
    )  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    missing = [m for m in args.methods if not os.path.isfile(os.path.join(ROOT, METHODS[m]))]
    if missing:
        raise SystemExit(f"recipes not found for {missing}: {[METHODS[m] for m in missing]}")
    rows = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "teacher_R50.pth")
        save_teacher(weights)
        student = run_worker("student", _worker_args(args, KD_CONFIG), weights)
        print(f"[kd_zoo_overhead] student: {student['median_s']:.3f} s/step, peak RSS growth "
              f"{student['peak_rss_growth_mib']:.0f} MiB", flush=True)  # fmt: skip
        for i, method in enumerate(args.methods):
            kd = run_worker("kd_masked", _worker_args(args, METHODS[method]), weights)
            rows[method] = {
                "recipe": METHODS[method],
                "kd_s_per_step": kd["median_s"],
                "time_ratio": kd["median_s"] / student["median_s"],
                "memory_ratio": kd["peak_rss_growth_mib"] / student["peak_rss_growth_mib"],
                "kd": kd,
            }
            r = rows[method]
            print(f"[kd_zoo_overhead] {i + 1}/{len(args.methods)} {method}: "
                  f"{r['kd_s_per_step']:.3f} s/step, time_ratio {r['time_ratio']:.2f}, "
                  f"memory_ratio {r['memory_ratio']:.2f} "
                  f"({time.perf_counter() - start:.0f} s so far)", flush=True)  # fmt: skip
    print("\n| method | KD s / step | time_ratio | memory_ratio |\n| --- | --- | --- | --- |")
    print(f"| student alone | {student['median_s']:.3f} | 1.00 | 1.00 |")
    for method, r in rows.items():
        print(f"| {method} | {r['kd_s_per_step']:.3f} | {r['time_ratio']:.2f} | "
              f"{r['memory_ratio']:.2f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "student": student, "methods": rows}, f, indent=2)
    return {"student": student, "methods": rows}


if __name__ == "__main__":
    main()
