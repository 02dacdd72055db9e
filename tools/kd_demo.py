#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""The KD-DETR main job: teacher, student without KD, student with KD-DETR, one table.

A preset of the KD bench (tools/kd_bench.py with configs/bench/demo.yaml):

1. Teacher: trained with ``--teacher-config`` (DAB-DETR, EfficientNet-Lite2) unless a cached run
   with the same resolved config exists in the teacher cache (``--teacher-cache``, default
   ``$KD_DETR_DATA/teachers`` or ``~/.cache/kd_detr/teachers``): the cache key hashes the
   teacher's resolved config (file, bases, overrides, datasets) and kd_detr's version.
2. For every seed: the student (``--student-config``, EfficientNet-Lite0) trained without KD, and
   the same student trained with KD-DETR (``--kd-config``) for the same iterations, schedule and
   seed, distilled from the teacher of step 1. Finished runs are skipped when run again.
3. Each model is evaluated by ``train_net.py`` (metrics_final.json); the job prints one table and
   writes ``OUTPUT/kd_demo_results.json`` and the bench's ``OUTPUT/bench_results.{json,md}``,
   ``OUTPUT/bench_ap.png``.

By default on the built-in synthetic demo dataset; ``--train`` / ``--test`` run it on your data,
e.g. ``--train instances_train.json --train-images train/ --test instances_val.json
--test-images val/`` or ``--train VOCdir --test VOCdir --classes 'a;b;c'`` (see kd_bench.py).
Each run is a ``train_net.py`` subprocess with its own log in its output folder. Extra arguments
after ``--`` are config overrides for both students, e.g. ``-- SOLVER.IMS_PER_BATCH 4``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kd_bench  # noqa: E402
from bench import BenchError, load_arms  # noqa: E402
from bench.runs import schedule_opts  # noqa: E402
from bench.runs import ROOT, bbox, config_chain, config_hash, resolve_config  # noqa: E402

PRESET = os.path.join(ROOT, "configs", "bench", "demo.yaml")
METRICS = ("AP", "AP50", "AP75")

__all__ = ["config_chain", "main", "parse_args", "schedule_opts", "teacher_key", "teacher_run"]


def parse_args(argv=None):
    spec = load_arms(PRESET)
    student, kd = spec.arms
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [-- KEY VALUE ...]",
    )
    parser.add_argument("--student-config", default=student.config)
    parser.add_argument("--kd-config", default=kd.config)
    parser.add_argument(
        "--student-iters", type=int, default=spec.iters,
        help="training iterations of both students (the learning rate drops at 5/6)",
    )  # fmt: skip
    kd_bench.add_bench_args(parser)
    parser.set_defaults(
        teacher_config=spec.teacher_config,
        teacher_iters=spec.teacher_iters,
        teacher_opts=[],
        seeds=spec.seeds,
        output="output/kd_demo",
    )
    return kd_bench.parse_with_overrides(parser, argv)


def _spec(args):
    spec = load_arms(PRESET)
    spec.arms[0].config, spec.arms[1].config = args.student_config, args.kd_config
    spec.iters = args.student_iters
    return spec


def teacher_key(config_file, opts):
    """Cache key of a teacher run: the hash of its resolved config (file with bases, overrides,
    registered datasets) and kd_detr's version. A change of code defaults that alters the
    teacher needs ``--teacher-cache none`` or a new version."""
    return config_hash(resolve_config(config_file, opts))


def teacher_run(args):
    """Train the teacher or reuse a cached run; returns (weights path, metrics, cached?)."""
    bench = kd_bench.Bench(_spec(args), args, PRESET)
    bench.ensure_teacher()
    teacher = bench.teacher
    metrics = {"results": {"teacher": {"bbox": teacher["bbox"]}}}
    return teacher["weights"], metrics, teacher["state"] == "cached"


def main(argv=None):
    args = parse_args(argv)
    try:
        result = kd_bench.run_bench(_spec(args), args, PRESET)
    except (BenchError, RuntimeError) as e:
        print(f"kd_demo: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if result is None:  # --dry-run
        return None
    teacher = result["teacher"]
    by_arm = {}
    for run in result["runs"]:
        by_arm.setdefault(run["seed"], {})[run["arm"]] = run
    runs = [
        {
            "seed": seed,
            "no_kd": {"bbox": arms["student"]["bbox"], "seconds": arms["student"]["seconds"]},
            "kd": {"bbox": arms["student_kd"]["bbox"], "seconds": arms["student_kd"]["seconds"]},
        }
        for seed, arms in sorted(by_arm.items())
    ]
    mean = {}
    for k in METRICS:
        no_kd = sum(r["no_kd"]["bbox"][k] for r in runs) / len(runs)
        kd = sum(r["kd"]["bbox"][k] for r in runs) / len(runs)
        mean[k] = {"no_kd": no_kd, "kd": kd, "gain": kd - no_kd}
    print(
        f"\nKD-DETR - no KD, mean over seeds {args.seeds}: "
        + ", ".join(f"{k} {mean[k]['gain']:+.1f} points" for k in METRICS)
    )
    demo = {
        "teacher": {
            "config": teacher["config"],
            "weights": teacher["weights"],
            "cached": teacher["state"] == "cached",
            "iters": teacher["iters"],
            "overrides": teacher["overrides"],
            "bbox": teacher["bbox"],
        },
        "students": {
            "config": args.student_config,
            "kd_config": args.kd_config,
            "iters": args.student_iters,
            "overrides": args.opts,
        },
        "runs": runs,
        "mean": mean,
        "job_seconds": result["job_seconds"],
    }
    path = os.path.join(os.path.abspath(args.output), "kd_demo_results.json")
    with open(path, "w") as f:
        json.dump(demo, f, indent=2)
    print(f"wrote {path}")
    return demo


__all__ += ["bbox"]

if __name__ == "__main__":
    main()
