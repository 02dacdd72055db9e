# Copyright (c) kd_detr contributors.
"""Helpers of ``tools/kd_bench.py``: arms files, the dataset switch, run bookkeeping, statistics
and reports. Imported as ``bench`` with ``tools/`` on ``sys.path`` (as kd_bench.py does)."""
from .arms import Arm, BenchError, BenchSpec, flat_opts, load_arms, parse_with_overrides
from .data import Dataset, DataSwitch, resolve_dataset
from .report import write_chart, write_markdown
from .runs import ROOT, config_hash, resolve_config, schedule_opts, train_run
from .stats import arm_stats, paired_difference
