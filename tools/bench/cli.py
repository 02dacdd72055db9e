# Copyright (c) kd_detr contributors.
"""The command-line flags that ``tools/kd_bench.py`` and ``tools/kd_demo.py`` share."""
import sys

__all__ = ["add_bench_args"]

# On/off flags: (flag, help).
_SWITCHES = (
    ("--dry-run", "check and print the plan only"),
    ("--report-only", "train nothing: write the results of the runs finished so far (in OUTPUT "
     "and in --results-from files), e.g. while other bench processes still run"),
    ("--teacher-only", "train (or find in the cache) the teacher, print its AP and stop"),
    ("--curves", "also evaluate every checkpoint of the finished runs (cached in each run "
     "folder) and write learning curves: OUTPUT/bench_curves.{json,md,png}"),
)


def add_bench_args(parser):
    """Flags shared by kd_bench.py and kd_demo.py (defaults None: from the arms file)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of every arm")
    parser.add_argument("--output", default=None, help="output folder")
    parser.add_argument("--teacher-config", default=None)
    parser.add_argument("--teacher-iters", type=int, default=None)
    parser.add_argument(
        "--teacher-opts", nargs="*", default=None, metavar="KEY VALUE",
        help="config overrides of the teacher (part of its cache key, passed to KD runs)",
    )  # fmt: skip
    parser.add_argument(
        "--teacher-weights", default=None,
        help="an already trained teacher checkpoint for --teacher-config: nothing is trained "
        "for the teacher and its class count is checked against the data",
    )  # fmt: skip
    parser.add_argument(
        "--teacher-cache", default=None,
        help="folder of cached teacher runs (default $KD_DETR_DATA/teachers or "
        "~/.cache/kd_detr/teachers); 'none' trains the teacher in OUTPUT/teacher",
    )  # fmt: skip
    group = parser.add_argument_group("dataset switch (all runs, teacher included)")
    group.add_argument("--train", default=None, help="registered name, COCO json or VOC folder")
    group.add_argument("--test", default=None, help="registered name, COCO json or VOC folder")
    group.add_argument("--train-images", default=None, help="image folder of a --train json")
    group.add_argument("--test-images", default=None, help="image folder of a --test json")
    group.add_argument("--train-split", default=None, help="VOC split of --train (trainval)")
    group.add_argument("--test-split", default=None, help="VOC split of --test (test)")
    group.add_argument("--classes", default=None, help="VOC class names, 'A;B;C' (class-id order)")
    parser.add_argument(
        "--results-from", nargs="+", default=[], metavar="BENCH_RESULTS_JSON",
        help="bench_results.json files of earlier benches (e.g. committed under docs/): their "
        "finished runs with the same config hash (and, for KD runs, the same teacher weights, "
        "by sha256) are taken over instead of trained again",
    )  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="interpreter for train_net.py")
    for flag, text in _SWITCHES:
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument(
        "--publish", default=None, metavar="DIR",
        help="after every finished run, copy the result files (and the curves with --curves) "
        "into DIR too, e.g. a folder under version control, so that the record of the finished "
        "runs outlives OUTPUT; an existing DIR/bench_results.json must be a --results-from file",
    )  # fmt: skip
