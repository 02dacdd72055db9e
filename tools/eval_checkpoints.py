#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Evaluate every periodic checkpoint of a training run: its learning curve on the test sets.

    python tools/eval_checkpoints.py output/my_run                 # OUTPUT_DIR of a train_net run
    python tools/eval_checkpoints.py output/my_run --every 2       # every other checkpoint
    python tools/eval_checkpoints.py output/my_run -- TEST.DETECTIONS_PER_IMAGE 50

The run's ``config.yaml`` (written by train_net.py) gives the model, the test sets and the
test-time settings; overrides after ``--`` change them (a changed setting evaluates everything
again). Results are cached in ``OUTPUT_DIR/checkpoint_metrics.json``: run it again while training
goes on and only the new checkpoints are evaluated. Prints the curve as a table (AP in percent).
"""
import argparse
import os
import sys

from tabulate import tabulate

from detectron2.utils.logger import setup_logger

from kd_detr.config import load_config
from kd_detr.engine import evaluate_checkpoints
from kd_detr.engine.checkpoint_curve import CURVE_FILE

METRICS = ("AP", "AP50", "AP75")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = []
    if "--" in argv:
        i = argv.index("--")
        argv, opts = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", help="OUTPUT_DIR of a run (checkpoints and config.yaml)")
    parser.add_argument("--config-file", default=None, help="default: OUTPUT_DIR/config.yaml")
    parser.add_argument("--every", type=int, default=1, help="every N-th checkpoint (last kept)")
    parser.add_argument("--force", action="store_true", help="evaluate cached checkpoints again")
    args = parser.parse_args(argv)
    if len(opts) % 2:
        parser.error(f"overrides after -- must be KEY VALUE pairs, got {opts}")
    args.opts = opts
    return args


def curve_rows(payload, metrics=METRICS):
    """``[iteration, dataset, task, *metrics]`` rows of an ``evaluate_checkpoints`` result."""
    rows = []
    for entry in payload["checkpoints"]:
        for dataset, tasks in entry["results"].items():
            for task, values in tasks.items():
                shown = [
                    "n/a" if values.get(k) is None else f"{values[k]:.2f}" for k in metrics
                ]
                rows.append([entry["iteration"], dataset, task, *shown])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="kd_detr")
    config_file = args.config_file or os.path.join(args.output_dir, "config.yaml")
    if not os.path.isdir(args.output_dir):
        print(f"error: {args.output_dir} is not a folder (give a run's OUTPUT_DIR)",
              file=sys.stderr)  # fmt: skip
        return 2
    if not os.path.isfile(config_file):
        print(
            f"error: {config_file} not found: give the run's config with --config-file",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(config_file, args.opts)
    try:
        payload = evaluate_checkpoints(cfg, args.output_dir, every=args.every, force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    headers = ["iteration", "dataset", "task", *[f"{k} (%)" for k in METRICS]]
    print(tabulate(curve_rows(payload), headers=headers, disable_numparse=True))
    print(f"(cached in {os.path.join(payload['output_dir'], CURVE_FILE)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
