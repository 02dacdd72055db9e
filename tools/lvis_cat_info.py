#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Write an LVIS cat_info json (per-category image_count / instance_count) from an LVIS json.

The counts are computed from the json's annotations, as Detic derives its
``lvis_v1_train_cat_info.json``. By default the rare classes get zero counts: the counts of the
open-vocabulary training split (lvis_v1_train_norare), for ``MODEL.OV.CAT_FREQ_PATH`` and the
federated loss. ``--keep-rare`` keeps them (Detic's file).

Examples:
    python tools/lvis_cat_info.py datasets/lvis/lvis_v1_train.json \\
        datasets/lvis/lvis_v1_train_norare_cat_info.json
    python tools/lvis_cat_info.py --keep-rare datasets/lvis/lvis_v1_train.json cat_info.json
"""
import argparse
import json
import logging
import os
import sys
from collections import Counter

from kd_detr.ov.lvis_split import LVIS_FREQUENCIES, build_lvis_cat_info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("lvis_json", help="LVIS json, e.g. lvis_v1_train.json")
    p.add_argument("output", help="output cat_info json (a list of categories)")
    p.add_argument("--keep-rare", action="store_true", help="keep the counts of rare classes")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.path.isfile(args.lvis_json):
        raise SystemExit(f"LVIS json not found: {args.lvis_json}")
    logging.info(f"Reading {args.lvis_json} ...")
    try:
        with open(args.lvis_json) as f:
            lvis = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{args.lvis_json} is not valid json: {e}") from None
    if not isinstance(lvis, dict) or "annotations" not in lvis or "categories" not in lvis:
        raise SystemExit(f"{args.lvis_json} is not an LVIS json (no annotations / categories)")
    try:
        cat_info = build_lvis_cat_info(
            lvis, zero_frequencies=() if args.keep_rare else ("r",), progress=True
        )
    except ValueError as e:
        raise SystemExit(f"{e}. Use --keep-rare for a json without frequencies.") from None
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(cat_info, f)
    groups = Counter(c.get("frequency", "?") for c in cat_info)
    shown = ", ".join(f"{f}: {groups[f]}" for f in LVIS_FREQUENCIES if f in groups)
    logging.info(
        f"Wrote {len(cat_info)} categories ({shown or 'no frequencies'}; rare counts "
        f"{'kept' if args.keep_rare else 'zeroed'}) to {args.output}"
    )
    return args.output


if __name__ == "__main__":
    main(sys.argv[1:])
