#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Check every image of a config's datasets: the file exists, decodes completely (a truncated
file fails) and has the width / height its annotations say. Prints each problem; exit status 1
when there is one.

    python tools/check_dataset.py --config-file CONFIG [--dataset NAME ...] [KEY VALUE ...]

Without ``--dataset``, checks ``DATASETS.TRAIN`` and ``DATASETS.TEST`` of the config.
"""
import argparse
import sys
from typing import List, Optional

from detectron2.data import DatasetCatalog

from kd_detr.config import load_config
from kd_detr.data import check_image_files


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the config whose datasets to check")
    parser.add_argument("--dataset", action="append", default=[], help="a dataset name (repeat)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    names = args.dataset or list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))
    found = 0
    for name in names:
        if name not in DatasetCatalog.list():
            print(f"{name}: not a registered dataset (is it listed in the config?)")
            found += 1
            continue
        problems = check_image_files(
            DatasetCatalog.get(name), max_headers=-1, full_decode=True, show_progress=True
        )
        print(f"{name}: {problems.total} images, {problems.checked_headers} decoded")
        for line in problems.lines(limit=10**9):
            print(f"  {line}")
        found += bool(problems)
    print("no problem found" if not found else f"problems in {found} dataset(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
