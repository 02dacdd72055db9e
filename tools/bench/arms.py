# Copyright (c) kd_detr contributors.
"""Arms files: YAML lists of the runs a bench compares.

An arms file is either a list of arms or a mapping with the list under ``arms`` and bench
defaults next to it (every default can be overridden on the command line)::

    teacher:                     # trained once (or taken from the cache) for every KD arm
      config: configs/bccd/dab_detr_efflite2_bccd.yaml
      iters: 600
      opts: []                   # teacher overrides (part of its cache key)
    iters: 300                   # iterations of every arm, the same schedule for all
    seeds: [0, 1, 2]
    baseline: no_kd              # paired differences are taken to this arm
    metrics: [AP, AP50, AP75]    # optional: the box metrics of the tables (default these three;
                                 # any key of the evaluator's results, e.g. AP-base, AP-novel)
    data:                        # optional dataset switch (kd_bench.py --train / --test ...)
      train: $KD_DETR_SHARED_DATA/bccd
      test: $KD_DETR_SHARED_DATA/bccd
      train_split: trainval
      test_split: test
      classes: RBC;WBC;Platelets
    claims:                      # optional: orderings to check, e.g. a paper's
      - {better: kd_detr, than: no_kd, source: "paper, Table 1"}   # metric: AP (default the
                                                                   # first of 'metrics')
      - {better: [kd_detr, general_only], than: [inconsistent, similar_fg]}  # groups: each
                                                   # seed's mean over the group's arms
    arms:
      - name: no_kd
        config: configs/bccd/dab_detr_efflite0_bccd.yaml
      - name: inconsistent
        config: configs/bccd/kd_dab_detr_efflite0_from_efflite2_bccd.yaml
        opts: {MODEL.KD.POINTS: inconsistent}   # or a flat [KEY, VALUE, ...] list
        label: "KD, inconsistent points"        # optional, shown in tables
        init_from_teacher: false                # optional: MODEL.WEIGHTS = the teacher's weights
                                                # (class-incremental fine-tuning of a base model)

Config paths are relative to the repository root (or absolute).
"""
import os
import re
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Union

__all__ = [
    "Arm", "BenchError", "BenchSpec", "Claim", "claim_side_arms", "claim_side_label", "flat_opts",
    "load_arms", "parse_with_overrides",
]  # fmt: skip

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ARM_KEYS = {"name", "config", "opts", "label", "init_from_teacher"}
_TOP_KEYS = {"arms", "teacher", "iters", "seeds", "baseline", "data", "metrics", "claims"}
_CLAIM_KEYS = {"better", "than", "source", "metric"}
_TEACHER_KEYS = {"config", "iters", "opts", "weights"}
DATA_KEYS = ("train", "test", "train_images", "test_images", "train_split", "test_split", "classes")


class BenchError(ValueError):
    """Bad bench input (arms file, dataset, teacher): raised before anything trains."""


@dataclass
class Arm:
    """One arm: a config plus overrides, trained once per seed."""

    name: str
    config: str
    opts: List[str] = field(default_factory=list)
    label: str = ""
    init_from_teacher: bool = False  # the run starts from the bench teacher's weights

    @property
    def title(self):
        return self.label or self.name


@dataclass
class Claim:
    """An ordering the bench checks: arm ``better`` above arm ``than`` in ``metric`` (None: the
    bench's first metric), with where the claim comes from. A side may be a list of arms: a
    group, compared through each seed's mean over its arms."""

    better: Union[str, List[str]]
    than: Union[str, List[str]]
    source: str = ""
    metric: Optional[str] = None


def claim_side_arms(side):
    """The arm names of one side of a claim (an arm name or a list of them)."""
    return [side] if isinstance(side, str) else list(side)


def claim_side_label(side):
    """How a claim's side reads in tables: the arm, or ``mean(a, b, ...)`` for a group."""
    return side if isinstance(side, str) else f"mean({', '.join(side)})"


@dataclass
class BenchSpec:
    """An arms file: the arms and the defaults it sets (None: not set by the file)."""

    arms: List[Arm]
    teacher_config: Optional[str] = None
    teacher_iters: Optional[int] = None
    teacher_opts: Optional[List[str]] = None
    teacher_weights: Optional[str] = None
    iters: Optional[int] = None
    seeds: Optional[List[int]] = None
    baseline: Optional[str] = None
    metrics: Optional[List[str]] = None
    data: dict = field(default_factory=dict)
    claims: List[Claim] = field(default_factory=list)


def flat_opts(value, where):
    """Overrides as a flat ``["KEY", "VALUE", ...]`` list of strings from a list or a mapping."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        if len(value) % 2:
            raise BenchError(f"{where}: overrides must be KEY VALUE pairs, got {list(value)}")
        items = list(zip(value[::2], value[1::2]))
    else:
        raise BenchError(f"{where}: 'opts' must be a list [KEY, VALUE, ...] or a mapping")
    out = []
    for key, val in items:
        out += [str(key), val if isinstance(val, str) else repr(val)]
    return out


def _check_keys(entry, allowed, where):
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _parse_arm(entry, index, source):
    where = f"{source}: arm #{index + 1}"
    if not isinstance(entry, dict):
        raise BenchError(f"{where} must be a mapping with 'name' and 'config', got {entry!r}")
    _check_keys(entry, _ARM_KEYS, where)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BenchError(
            f"{where}: 'name' must be letters, digits, '_', '.' or '-' (it names the run "
            f"folders), got {name!r}"
        )
    where = f"{source}: arm {name!r}"
    config = entry.get("config")
    if not isinstance(config, str) or not config:
        raise BenchError(f"{where} has no 'config' (a config file path)")
    init = entry.get("init_from_teacher", False)
    if not isinstance(init, bool):
        raise BenchError(f"{where}: 'init_from_teacher' must be true or false, got {init!r}")
    opts = flat_opts(entry.get("opts"), where)
    return Arm(name, config, opts, str(entry.get("label", "")), init_from_teacher=init)


def _claim_side(value, key, names, where):
    """One side of a claim: an arm name, or a list of two or more arm names (a group)."""
    group = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if group and len(value) >= 2 and len(set(value)) == len(value):
        unknown = [v for v in value if v not in names]
        if not unknown:
            return list(value)
        raise BenchError(f"{where}: '{key}' names arms not in the file: {unknown} (arms: {names})")
    if isinstance(value, str) and value in names:
        return value
    raise BenchError(f"{where}: '{key}' must name an arm of the file {names}, or list two or "
                     f"more different ones (a group: each seed's mean), got {value!r}")


def _parse_claims(entries, names, source):
    """The ``claims:`` list: each names two arms of the file, or two disjoint groups of them."""
    if not isinstance(entries, list):
        raise BenchError(f"{source}: 'claims' must be a list of {{better, than, source}} entries")
    claims = []
    for index, entry in enumerate(entries):
        where = f"{source}: claim #{index + 1}"
        if not isinstance(entry, dict):
            raise BenchError(f"{where} must be a mapping with 'better' and 'than', got {entry!r}")
        _check_keys(entry, _CLAIM_KEYS, where)
        better, than = (_claim_side(entry.get(k), k, names, where) for k in ("better", "than"))
        overlap = set(claim_side_arms(better)) & set(claim_side_arms(than))
        if overlap:
            raise BenchError(f"{where}: 'better' and 'than' share the arm(s) {sorted(overlap)}")
        metric = entry.get("metric")
        claims.append(Claim(better, than, str(entry.get("source", "")),
                            None if metric is None else str(metric)))  # fmt: skip
    return claims


def load_arms(path):
    """Read an arms file (see the module docstring).

    Raises:
        BenchError: a missing file, malformed YAML or an invalid entry, named.
    """
    import yaml

    if not os.path.isfile(path):
        raise BenchError(f"arms file not found: {path} (see configs/bench/ for examples)")
    with open(path) as f:
        try:
            content = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise BenchError(f"{path} is not valid YAML: {e}") from e
    spec = BenchSpec(arms=[])
    if isinstance(content, dict):
        _check_keys(content, _TOP_KEYS, path)
        teacher = content.get("teacher") or {}
        if not isinstance(teacher, dict):
            raise BenchError(f"{path}: 'teacher' must be a mapping with 'config', 'iters', 'opts'")
        _check_keys(teacher, _TEACHER_KEYS, f"{path}: teacher")
        spec.teacher_config = teacher.get("config")
        spec.teacher_iters = teacher.get("iters")
        spec.teacher_weights = teacher.get("weights")
        if "opts" in teacher:
            spec.teacher_opts = flat_opts(teacher["opts"], f"{path}: teacher")
        spec.iters = content.get("iters")
        seeds = content.get("seeds")
        spec.seeds = [seeds] if isinstance(seeds, int) else seeds
        spec.baseline = content.get("baseline")
        metrics = content.get("metrics")
        if metrics is not None and (not isinstance(metrics, list) or not metrics
                                    or not all(isinstance(m, str) and m for m in metrics)):
            raise BenchError(f"{path}: 'metrics' must be a list of metric names such as "
                             f"[AP, AP50, AP75], got {metrics!r}")  # fmt: skip
        spec.metrics = metrics
        data = content.get("data") or {}
        if not isinstance(data, dict):
            raise BenchError(f"{path}: 'data' must be a mapping with keys {list(DATA_KEYS)}")
        _check_keys(data, set(DATA_KEYS), f"{path}: data")
        spec.data = {k: str(v) for k, v in data.items() if v is not None}
        claims = content.get("claims")
        content = content.get("arms")
    else:
        claims = None
    if not isinstance(content, list) or not content:
        raise BenchError(f"{path}: no arms (expected a list of arms, or a mapping with 'arms')")
    spec.arms = [_parse_arm(entry, i, path) for i, entry in enumerate(content)]
    names = [arm.name for arm in spec.arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchError(f"{path}: arm names must be unique, repeated: {duplicates}")
    if claims is not None:
        spec.claims = _parse_claims(claims, names, path)
    return spec


def parse_with_overrides(parser, argv=None):
    """``parser.parse_args`` with everything after ``--`` as ``args.opts`` (KEY VALUE pairs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = []
    if "--" in argv:
        i = argv.index("--")
        argv, opts = argv[:i], argv[i + 1 :]
    args = parser.parse_args(argv)
    args.opts = opts
    for name in ("opts", "teacher_opts"):
        if len(getattr(args, name) or []) % 2:
            parser.error(f"overrides must be KEY VALUE pairs, got {getattr(args, name)}")
    return args
