#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Print the metrics JSON written by train_net.py as a table (AP values in percent; ``null``, an
undefined metric such as APl on a split without large objects, prints as "n/a")."""
import argparse
import json

from tabulate import tabulate


def _percent(value):
    if isinstance(value, str):
        return value
    return "n/a" if value is None else f"{value:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics_json")
    args = parser.parse_args()
    with open(args.metrics_json) as f:
        metrics = json.load(f)
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    rows = []
    for dataset, tasks in (metrics.get("results") or {}).items():
        for task, values in tasks.items():
            rows.append([dataset, task] + [_percent(values.get(k, "-")) for k in names])
    # Columns no task reports are left out; a missing value in a kept column prints as "-".
    kept = [i for i, _ in enumerate(names) if any(row[2 + i] != "-" for row in rows)]
    headers = ["dataset", "task"] + [f"{names[i]} (%)" for i in kept]
    rows = [row[:2] + [row[2 + i] for i in kept] for row in rows]
    print(tabulate(rows, headers=headers, disable_numparse=True))
    extras = {k: v for k, v in metrics.items() if k not in ("results", "solver")}
    solver = metrics.get("solver") or {}
    # SOLVER values as configured -> as run (they differ when REFERENCE_WORLD_SIZE rescaled them).
    for key, configured in (solver.get("configured") or {}).items():
        as_run = solver.get("as_run", {}).get(key, configured)
        shown = configured if as_run == configured else f"{configured} -> {as_run}"
        extras[f"SOLVER.{key}"] = shown
    if extras:
        print(tabulate(sorted(extras.items()), headers=["field", "value"], disable_numparse=True))
    print(f"(from {args.metrics_json})")


if __name__ == "__main__":
    main()
