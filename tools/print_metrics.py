#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Print the metrics JSON written by train_net.py as a table (AP values in percent; ``null``, an
undefined metric such as APl on a split without large objects, prints as "n/a")."""
import argparse
import json

from tabulate import tabulate


def _percent(value):
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
            keys = [k for k in names if k in values]
            rows.append([dataset, task] + [_percent(values[k]) for k in keys])
    headers = ["dataset", "task"] + [f"{k} (%)" for k in names]
    print(tabulate(rows, headers=headers[: max(len(r) for r in rows)] if rows else headers))
    extras = {k: v for k, v in metrics.items() if k != "results"}
    if extras:
        print(tabulate(sorted(extras.items()), headers=["field", "value"]))
    print(f"(from {args.metrics_json})")


if __name__ == "__main__":
    main()
