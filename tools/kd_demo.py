#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""The KD-DETR main job: teacher, student without KD, student with KD-DETR, one table.

1. Teacher: trained with ``--teacher-config`` (DAB-DETR, EfficientNet-Lite2) unless a cached run
   with the same resolved config exists in the teacher cache (``--teacher-cache``, default
   ``$KD_DETR_DATA/teachers`` or ``~/.cache/kd_detr/teachers``): the cache key hashes the
   teacher's config files (with their bases), its overrides and kd_detr's version.
2. For every seed: the student (``--student-config``, EfficientNet-Lite0) trained without KD, and
   the same student trained with KD-DETR (``--kd-config``) for the same iterations, schedule and
   seed, distilled from the teacher of step 1.
3. Each model is evaluated on the demo validation set by ``train_net.py`` (metrics_final.json);
   the job prints one table and writes ``OUTPUT/kd_demo_results.json``.

Each run is a ``train_net.py`` subprocess with its own log in its output folder. Extra arguments
after ``--`` are config overrides for both students, e.g. ``-- SOLVER.IMS_PER_BATCH 4``.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("AP", "AP50", "AP75")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher-config", default="configs/demo/dab_detr_efflite2_demo.yaml"
    )
    parser.add_argument("--student-config", default="configs/demo/dab_detr_efflite0_demo.yaml")
    parser.add_argument(
        "--kd-config", default="configs/kd_detr/kd_dab_detr_efflite0_from_efflite2_demo.yaml"
    )
    parser.add_argument(
        "--teacher-iters", type=int, default=1500, help="teacher training iterations"
    )
    parser.add_argument(
        "--student-iters",
        type=int,
        default=800,
        help="training iterations of both students (the learning rate drops at 5/6)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds")
    parser.add_argument("--output", default="output/kd_demo", help="output folder")
    parser.add_argument(
        "--teacher-cache",
        default=None,
        help="folder of cached teacher runs (default $KD_DETR_DATA/teachers or "
        "~/.cache/kd_detr/teachers); 'none' always trains the teacher in OUTPUT/teacher",
    )
    parser.add_argument(
        "--teacher-opts",
        nargs="*",
        default=[],
        metavar="KEY VALUE",
        help="config overrides of the teacher run (part of its cache key)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for train_net.py")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... (students)")
    args = parser.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    for name in ("opts", "teacher_opts"):
        if len(getattr(args, name)) % 2:
            parser.error(f"overrides must be KEY VALUE pairs, got {getattr(args, name)}")
    return args


def schedule_opts(iters):
    """Overrides for a run of ``iters`` iterations with the demo's shape of schedule."""
    if iters < 1:
        raise ValueError(f"iterations must be >= 1, got {iters}")
    drop = round(iters * 5 / 6)
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({drop},)" if 0 < drop < iters else "()",
        "SOLVER.WARMUP_ITERS",
        str(min(50, iters)),
    ]


def config_chain(config_file):
    """Texts of ``config_file`` and of its ``_BASE_`` files, recursively (paths from ROOT)."""
    import yaml

    path = os.path.join(ROOT, config_file)
    with open(path) as f:
        text = f.read()
    base = (yaml.safe_load(text) or {}).get("_BASE_")
    parents = []
    if base:
        parents = config_chain(os.path.relpath(os.path.join(os.path.dirname(path), base), ROOT))
    return parents + [text]


def teacher_key(config_file, opts):
    """Cache key of a teacher run: its config files (with bases), overrides and kd_detr's
    version. A change of code defaults that alters the teacher needs ``--teacher-cache none``
    or a new version."""
    import kd_detr

    parts = config_chain(config_file) + [repr(list(opts)), kd_detr.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def default_teacher_cache():
    base = os.environ.get("KD_DETR_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "kd_detr"
    )
    return os.path.join(base, "teachers")


def train(python, config_file, out_dir, opts, label):
    """Run train_net.py; returns its metrics_final.json content. The log goes to out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    cmd = [python, "train_net.py", "--config-file", config_file, "OUTPUT_DIR", out_dir] + list(
        opts
    )
    log_path = os.path.join(out_dir, "kd_demo_stdout.log")
    print(f"[kd_demo] {label}: {' '.join(cmd)}", flush=True)
    print(f"[kd_demo]   log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            log.write(line)
            # Detectron2's periodic lines (iteration, losses, ETA) and the final table.
            if " iter: " in line or "Wrote final metrics" in line or "Error" in line:
                print(f"  {label} | {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"[kd_demo] {label} failed with exit code {rc}; see {log_path}")
    with open(os.path.join(out_dir, "metrics_final.json")) as f:
        metrics = json.load(f)
    metrics["command_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def teacher_run(args):
    """Train the teacher or reuse a cached run; returns (weights path, metrics, cached?)."""
    opts = schedule_opts(args.teacher_iters) + list(args.teacher_opts)
    if args.teacher_cache == "none":
        out_dir = os.path.join(args.output, "teacher")
    else:
        key = teacher_key(args.teacher_config, opts)
        cache = args.teacher_cache or default_teacher_cache()
        out_dir = os.path.join(cache, f"{os.path.basename(args.teacher_config)[:-5]}-{key}")
        weights = os.path.join(out_dir, "model_final.pth")
        done = os.path.join(out_dir, "metrics_final.json")
        if os.path.exists(weights) and os.path.exists(done):
            with open(done) as f:
                metrics = json.load(f)
            print(f"[kd_demo] teacher: reusing the cached run {out_dir}", flush=True)
            return weights, metrics, True
        # A partial run (interrupted) is started again from scratch.
        shutil.rmtree(out_dir, ignore_errors=True)
    metrics = train(args.python, args.teacher_config, out_dir, opts, "teacher")
    return os.path.join(out_dir, "model_final.pth"), metrics, False


def bbox(metrics):
    values = next(iter(metrics["results"].values()))["bbox"]
    return {k: values[k] for k in METRICS}


def mean(values):
    return sum(values) / len(values)


def main(argv=None):
    args = parse_args(argv)
    args.output = os.path.abspath(args.output)
    start = time.perf_counter()
    weights, teacher_metrics, cached = teacher_run(args)
    students = schedule_opts(args.student_iters) + args.opts
    runs = []
    for seed in args.seeds:
        seed_opts = students + ["SEED", str(seed)]
        plain = train(
            args.python,
            args.student_config,
            os.path.join(args.output, f"student_seed{seed}"),
            seed_opts,
            f"student (no KD, seed {seed})",
        )
        kd = train(
            args.python,
            args.kd_config,
            os.path.join(args.output, f"student_kd_seed{seed}"),
            seed_opts + ["MODEL.KD.TEACHER.WEIGHTS", weights],
            f"student (KD-DETR, seed {seed})",
        )
        runs.append({"seed": seed, "no_kd": plain, "kd": kd})

    rows = [
        [
            "teacher" + (" (cached)" if cached else ""),
            "-",
            args.teacher_iters,
            *[f"{bbox(teacher_metrics)[k]:.1f}" for k in METRICS],
            teacher_metrics.get("train_and_eval_seconds", "-") if not cached else "cached",
        ]
    ]
    for run in runs:
        for name, key in (("student, no KD", "no_kd"), ("student, KD-DETR", "kd")):
            m = run[key]
            rows.append(
                [name, run["seed"], args.student_iters]
                + [f"{bbox(m)[k]:.1f}" for k in METRICS]
                + [m.get("train_and_eval_seconds", "-")]
            )
    summary = {
        k: {
            "no_kd": mean([bbox(r["no_kd"])[k] for r in runs]),
            "kd": mean([bbox(r["kd"])[k] for r in runs]),
        }
        for k in METRICS
    }
    for k in METRICS:
        summary[k]["gain"] = summary[k]["kd"] - summary[k]["no_kd"]
    total = round(time.perf_counter() - start, 1)
    print(f"\nteacher: {args.teacher_config}\nstudent: {args.student_config}")
    print(f"KD:      {args.kd_config}")
    headers = ["model", "seed", "iters", *(f"{k} (%)" for k in METRICS), "train + eval s"]
    print(tabulate(rows, headers=headers))
    print(
        f"\nKD-DETR - no KD, mean over seeds {args.seeds}: "
        + ", ".join(f"{k} {summary[k]['gain']:+.1f} points" for k in METRICS)
    )
    print(f"whole job: {total:.0f} s")
    result = {
        "teacher": {
            "config": args.teacher_config,
            "weights": weights,
            "cached": cached,
            "iters": args.teacher_iters,
            "overrides": args.teacher_opts,
            "bbox": bbox(teacher_metrics),
        },
        "students": {
            "config": args.student_config,
            "kd_config": args.kd_config,
            "iters": args.student_iters,
            "overrides": args.opts,
        },
        "runs": [
            {
                "seed": r["seed"],
                "no_kd": {"bbox": bbox(r["no_kd"]), "seconds": r["no_kd"].get("command_seconds")},
                "kd": {"bbox": bbox(r["kd"]), "seconds": r["kd"].get("command_seconds")},
            }
            for r in runs
        ],
        "mean": summary,
        "job_seconds": total,
    }
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "kd_demo_results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
