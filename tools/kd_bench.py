#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""KD bench: arms (config + overrides) x seeds on any dataset, one shared cached teacher.

    python tools/kd_bench.py configs/bench/kd_detr_ablation.yaml --seeds 0 1 2
    python tools/kd_bench.py configs/bench/demo.yaml --train my/instances_train.json \\
        --train-images my/train --test my/instances_val.json --test-images my/val
    python tools/kd_bench.py configs/bench/demo.yaml --train path/VOCfolder --train-split train \\
        --test path/VOCfolder --test-split val --classes "RBC;WBC;Platelets"

1. Everything is checked first (arms, configs, datasets, classes of the teacher and the students):
   bad input stops the bench before anything trains, naming the arm and the problem.
2. The teacher (``teacher:`` in the arms file or ``--teacher-config``) is trained once for all KD
   arms, or reused from the teacher cache (``--teacher-cache``, default ``$KD_DETR_DATA/teachers``
   or ``~/.cache/kd_detr/teachers``), keyed by the hash of its resolved config.
3. Every arm is trained and evaluated for every seed by a ``train_net.py`` subprocess in
   ``OUTPUT/<arm>_seed<seed>`` (Detectron2's log.txt, metrics.json, metrics_final.json), all arms
   with the same iterations and schedule. KD arms (``MODEL.KD.ENABLED``) get the teacher's
   config, overrides and weights (``MODEL.KD.TEACHER.*``), except EMA self-distillation arms
   (``MODEL.KD.TEACHER.EMA.ENABLED``), whose teacher is the student's own average: a bench of
   such arms trains no teacher. Arms with ``init_from_teacher: true`` start from the teacher's
   weights (``MODEL.WEIGHTS``; class-incremental fine-tuning of a base model), with or without KD.
4. Resumable: a run whose ``bench_run.json`` matches its resolved config hash is skipped, so an
   interrupted bench continues where it stopped and a changed arm reruns. Several processes may
   run the same bench on one output folder: each claims a run before training it
   (``bench/run_lock.py``) and skips the runs the others train.
5. Results: ``OUTPUT/bench_results.json`` (every run), ``OUTPUT/bench_results.md`` (per arm mean
   and std of AP / AP50 / AP75 over seeds, paired difference to ``--baseline`` with a 95%
   t-interval), ``OUTPUT/bench_ap.png``; with ``--curves`` the learning curves from every run's
   checkpoints, ``OUTPUT/bench_curves.{json,md,png}`` (``bench/curves.py``). ``--publish DIR``
   refreshes copies of these files in DIR after every run (``bench/publish.py``): a record of the
   finished runs that outlives OUTPUT, for ``--results-from DIR/bench_results.json`` later.

``--train`` / ``--test`` put every model on other data: a registered dataset name, a COCO json
(with ``--train-images`` / ``--test-images``) or a VOC folder (with ``--train-split`` /
``--test-split`` and ``--classes``); the class count follows. Extra arguments after ``--`` are
config overrides of every arm (not of the teacher: use ``--teacher-opts``).
"""
import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402; fmt: skip
    ROOT,
    Arm,
    BenchError,
    BenchSpec,
    config_hash,
    flat_opts,
    load_arms,
    parse_with_overrides,
    schedule_opts,
    train_run,
)
from bench.checks import BenchChecksMixin, _pick  # noqa: E402
from bench.cli import add_bench_args  # noqa: E402
from bench.curves import write_curves  # noqa: E402
from bench.progress import bench_eta  # noqa: E402
from bench.publish import (  # noqa: E402; fmt: skip
    CURVE_FILES,
    RESULT_FILES,
    check_publish_target,
    publish,
    publish_lock,
)
from bench.report import METRICS, duration, print_plan, print_tables  # noqa: E402
from bench.results import BenchResultsMixin  # noqa: E402
from bench.run_lock import RunLock  # noqa: E402
from bench.runs import (  # noqa: E402; fmt: skip
    config_path,
    default_teacher_cache,
    finished_run,
    record_fields,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s ARMS_FILE [options] [-- KEY VALUE ...]",
    )
    parser.add_argument("arms_file", help="YAML arms file, e.g. configs/bench/demo.yaml")
    parser.add_argument("--iters", type=int, default=None, help="iterations of every arm")
    parser.add_argument("--baseline", default=None, help="arm the differences are taken to")
    parser.add_argument(
        "--arms", nargs="+", default=None,
        help="run only these arms (with --seeds too: the result files still cover every arm and "
        "seed finished in OUTPUT, so processes running parts of a bench can share it)",
    )  # fmt: skip
    add_bench_args(parser)
    return parse_with_overrides(parser, argv)


def _needs_teacher(cfg) -> bool:
    """A KD arm with an external teacher; an EMA self-distillation arm
    (``MODEL.KD.TEACHER.EMA.ENABLED``) builds its teacher from the student and gets none."""
    return bool(cfg.MODEL.KD.ENABLED and not cfg.MODEL.KD.TEACHER.EMA.ENABLED)


class Bench(BenchChecksMixin, BenchResultsMixin):
    """A checked bench plan: the teacher, every run with its resolved config hash."""

    def __init__(self, spec: BenchSpec, args, arms_file="(arms)"):
        self.args, self.arms_file, self.spec = args, arms_file, spec
        self.after_run = None  # called with the result after every run this process trains
        self.arms = spec.arms
        if getattr(args, "arms", None):
            unknown = sorted(set(args.arms) - {a.name for a in spec.arms})
            if unknown:
                raise BenchError(f"--arms: no arm named {unknown} in {arms_file}")
            self.arms = [a for a in spec.arms if a.name in args.arms]
        self.iters = _pick(getattr(args, "iters", None), spec.iters)
        self.seeds = _pick(args.seeds, spec.seeds, [0])
        self.metrics = tuple(spec.metrics or METRICS)
        names = [a.name for a in self.arms]
        self.baseline = getattr(args, "baseline", None)
        if self.baseline is None:  # the file's baseline, unless --arms left it out
            self.baseline = spec.baseline if spec.baseline in names else names[0]
        self.teacher_config = _pick(args.teacher_config, spec.teacher_config)
        self.teacher_iters = _pick(args.teacher_iters, spec.teacher_iters, 1500)
        self.teacher_opts = list(_pick(args.teacher_opts, spec.teacher_opts, []))
        self.teacher_weights = _pick(args.teacher_weights, spec.teacher_weights)
        self.base_entries = {}
        stem = os.path.splitext(os.path.basename(arms_file))[0]
        self.output = os.path.abspath(args.output or os.path.join("output", "kd_bench", stem))
        self._check_files()
        if not self.iters or self.iters < 1:
            raise BenchError(f"{arms_file}: no iterations (set 'iters:' or --iters N >= 1)")
        if self.baseline not in {a.name for a in self.arms}:
            raise BenchError(f"--baseline {self.baseline!r} is not one of the arms {names}")
        self._check_claims()
        self.data = self._resolve_data()
        self._plan()

    # -- checks, all before anything trains ---------------------------------------------------
    def _check_files(self):
        for arm in self.arms:
            if not os.path.isfile(config_path(arm.config)):
                raise BenchError(
                    f"arm {arm.name!r}: config {arm.config!r} not found (paths are relative to "
                    f"the repository root {ROOT})"
                )
        if self.teacher_config and not os.path.isfile(config_path(self.teacher_config)):
            raise BenchError(f"teacher config {self.teacher_config!r} not found")
        if self.teacher_weights and not os.path.isfile(self.teacher_weights):
            raise BenchError(f"--teacher-weights {self.teacher_weights!r} not found")

    # -- the plan ------------------------------------------------------------------------------
    def _plan(self):
        """Resolve the teacher and every run: configs, hashes, output folders."""
        opts = list(self.args.opts or [])
        schedule = schedule_opts(self.iters)
        self.runs, self.teacher = [], None
        kd_arms = []
        for arm in self.arms:
            base = list(arm.opts) + opts + schedule
            cfg = self._resolve(f"arm {arm.name!r}", arm.config,
                                base + self.data_opts(f"arm {arm.name!r}", arm.config, base))
            if _needs_teacher(cfg) or arm.init_from_teacher:
                kd_arms.append(arm)
        if kd_arms:
            self._plan_teacher(kd_arms[0])
        for seed in self.seeds:
            for arm in self.arms:
                self.runs.append(self._plan_run(arm, seed, opts, schedule))

    def _plan_teacher(self, first_kd_arm):
        if not self.teacher_config:
            raise BenchError(
                f"arm {first_kd_arm.name!r} uses KD (or init_from_teacher) but no teacher is set "
                "('teacher: config:' in the arms file or --teacher-config)"
            )
        what = f"teacher {self.teacher_config!r}"
        opts = schedule_opts(self.teacher_iters) + self.teacher_opts
        # A given checkpoint keeps its own class count: it is checked against the data.
        self.teacher_data_opts = self.data_opts(
            what, self.teacher_config, opts, class_key=not self.teacher_weights
        )
        cfg = self._resolve(what, self.teacher_config, opts + self.teacher_data_opts)
        if not self.teacher_weights:
            self._check_classes(what, cfg)
        key = config_hash(cfg)
        name = os.path.basename(self.teacher_config)[:-5]
        cache = self.args.teacher_cache
        if self.teacher_weights:
            out_dir, weights = None, os.path.abspath(self.teacher_weights)
        else:
            if cache == "none":
                out_dir = os.path.join(self.output, "teacher")
            else:
                out_dir = os.path.join(cache or default_teacher_cache(), f"{name}-{key}")
            weights = os.path.join(out_dir, "model_final.pth")
        self.teacher = {"config": self.teacher_config, "iters": self.teacher_iters,
                        "opts": opts + self.teacher_data_opts, "overrides": self.teacher_opts,
                        "key": key, "out_dir": out_dir, "weights": weights}  # fmt: skip

    def _plan_run(self, arm, seed, opts, schedule):
        what = f"arm {arm.name!r}"
        run_opts = list(arm.opts) + opts + schedule + ["SEED", str(seed)]
        run_opts += self.data_opts(what, arm.config, run_opts)
        cfg = self._resolve(what, arm.config, run_opts)
        self._check_classes(what, cfg)
        teacher_key = None
        if _needs_teacher(cfg):
            t_opts = list(cfg.MODEL.KD.TEACHER.OPTS) + self.teacher_opts + self.teacher_data_opts
            run_opts += [
                "MODEL.KD.TEACHER.CONFIG_FILE", self.teacher_config,
                "MODEL.KD.TEACHER.OPTS", repr(t_opts),
                "MODEL.KD.TEACHER.WEIGHTS", self.teacher["weights"],
            ]  # fmt: skip
            cfg = self._resolve(what, arm.config, run_opts)
            teacher_cfg = self._resolve(f"{what}: its teacher", self.teacher_config, t_opts)
            self._check_teacher_classes(arm, cfg, teacher_cfg)
            teacher_key = self.teacher["key"]
        if arm.init_from_teacher:  # e.g. class-incremental fine-tuning of the base model
            run_opts += ["MODEL.WEIGHTS", self.teacher["weights"]]
            cfg = self._resolve(what, arm.config, run_opts)
            teacher_key = self.teacher["key"]
        return {
            "arm": arm.name, "title": arm.title, "seed": seed, "config": arm.config,
            "opts": run_opts, "kd": teacher_key is not None,  # uses the bench's teacher
            "hash": config_hash(cfg, teacher_key),
            "out_dir": os.path.join(self.output, f"{arm.name}_seed{seed}"),
            "classes": self._classes_of(cfg),
            "datasets": [list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)],
        }  # fmt: skip

    # -- running -------------------------------------------------------------------------------
    def ensure_teacher(self, wait: bool = True) -> bool:
        """Train the teacher, or reuse the cached run / given weights; sets its state.

        Args:
            wait: while another bench process trains the teacher, wait for it (True) or return
                False at once (the caller trains the runs that need no teacher meanwhile).

        Returns:
            bool: whether the teacher is ready (or the bench needs none).
        """
        t = self.teacher
        if t is None:
            return True
        if t["out_dir"] is None:
            t.update(state="given", bbox=None)
            print(f"[kd_bench] teacher: given weights {t['weights']}", flush=True)
            self._fingerprint_teacher()
            return True
        lock = self._claim_teacher(t, wait=wait)
        if lock is None:
            return False
        try:
            record = finished_run(t["out_dir"], t["key"])
            if record and os.path.isfile(t["weights"]):
                t.update(state="cached", **record_fields(record))
                print(f"[kd_bench] teacher: reusing the cached run {t['out_dir']}", flush=True)
                self._fingerprint_teacher()
                return True
            print(f"[kd_bench] teacher: training {t['iters']} iterations "
                  f"(log {t['out_dir']}/log.txt)", flush=True)  # fmt: skip
            record = train_run(self.args.python, t["config"], t["out_dir"], t["opts"],
                               label="teacher", run_hash=t["key"], max_iter=t["iters"],
                               record={"config": t["config"], "opts": t["opts"]})  # fmt: skip
        finally:
            lock.release()
        t.update(state="trained", **record_fields(record))
        print(f"[kd_bench] teacher: done in {record['seconds']:.0f} s, AP "
              f"{record['bbox']['AP']:.1f}", flush=True)  # fmt: skip
        self._fingerprint_teacher()
        return True

    def _claim_teacher(self, t, poll_seconds=30.0, wait=True):
        """Claim the teacher's run folder, waiting while another bench process trains it (every
        KD run needs it; that process's result is then reused from the cache). Without
        ``wait``, None while the other process holds it."""
        lock = RunLock(t["out_dir"])
        holder = lock.acquire()
        if holder is not None:
            print(f"[kd_bench] teacher: being trained by process {holder.get('pid')} on "
                  f"{holder.get('host')} (since {holder.get('since')}); "
                  + ("waiting for it" if wait else "the runs without KD first"),
                  flush=True)  # fmt: skip
            if not wait:
                return None
            while lock.acquire() is not None:
                time.sleep(poll_seconds)
        return lock

    def _fingerprint_teacher(self):
        """sha256 of the teacher's weights file: the identity of "the same teacher" for runs
        taken over from earlier benches (``--results-from``)."""
        from kd_detr.distill.fingerprint import file_sha256

        t = self.teacher
        t["weights_sha256"] = file_sha256(t["weights"])
        print(f"[kd_bench] teacher: weights sha256 {t['weights_sha256']}", flush=True)

    def report_only(self, ran=None):
        """Results of what is finished, training nothing (the teacher's weights are
        fingerprinted when present, for ``--results-from``).

        Args:
            ran (dict or None): the result of this process's :meth:`run_all` over a part of
                this bench: its teacher record (state, fingerprint) and job time are kept.
        """
        os.makedirs(self.output, exist_ok=True)
        self.collect_finished()
        t = self.teacher
        if ran is not None and ran.get("teacher") is not None and t is not None:
            self.teacher = ran["teacher"]  # the same planned teacher, already fingerprinted
        elif t is not None:
            record = finished_run(t["out_dir"], t["key"]) if t["out_dir"] else None
            state = "cached" if record else "given" if t["out_dir"] is None else "not trained"
            t.update(state=state, **record_fields(record))
            if os.path.isfile(t["weights"]):
                self._fingerprint_teacher()
        self.take_over_results()
        return self.write_results(ran["job_seconds"] if ran else 0.0)

    def run_all(self):
        start = time.perf_counter()
        os.makedirs(self.output, exist_ok=True)
        self.collect_finished()
        elsewhere, done = [], set()
        if not self.ensure_teacher(wait=False):  # another process trains it: no-KD runs first
            self.take_over_results(plain_only=True)
            for i, run in enumerate(self.runs):
                if not run["kd"]:
                    self._run_one(i, run, start, elsewhere)
                    done.add(i)
            self.ensure_teacher()
        self.take_over_results()
        for i, run in enumerate(self.runs):
            if i not in done:
                self._run_one(i, run, start, elsewhere)
        self.collect_finished()  # runs other processes finished meanwhile
        if elsewhere:
            left = [f"{r['arm']} seed {r['seed']}" for r in elsewhere if r.get("state") is None]
            if left:
                print(f"[kd_bench] {len(left)} run(s) still trained by other processes "
                      f"({', '.join(left)}): --report-only once they finish", flush=True)
        return self.write_results(time.perf_counter() - start)

    def _run_one(self, i, run, start, elsewhere):
        """Train and evaluate one run of the plan unless it is finished, taken over, or claimed
        by another process (then appended to ``elsewhere``)."""
        total = len(self.runs)
        head = f"[kd_bench] run {i + 1}/{total} {run['arm']} seed {run['seed']}:"
        if run.get("state") in ("finished", "imported"):
            print(f"{head} {run['state']} before, skipped (AP {run['bbox']['AP']:.1f})",
                  flush=True)  # fmt: skip
            return
        lock = RunLock(run["out_dir"])
        holder = lock.acquire()
        if holder is not None:
            print(f"{head} being trained by process {holder.get('pid')} on "
                  f"{holder.get('host')} (since {holder.get('since')}), skipped", flush=True)
            elsewhere.append(run)
            return
        record = finished_run(run["out_dir"], run["hash"])  # by another process meanwhile
        if record:
            lock.release()
            run.update(state="finished", **record_fields(record))
            print(f"{head} finished by another process, skipped", flush=True)
            return
        print(f"{head} training ({bench_eta(self.runs, run)}); log {run['out_dir']}/log.txt",
              flush=True)  # fmt: skip
        try:
            record = train_run(self.args.python, run["config"], run["out_dir"], run["opts"],
                               label=f"{run['arm']} seed {run['seed']}",
                               run_hash=run["hash"], max_iter=self.iters,
                               record={k: run[k] for k in ("arm", "seed", "config", "opts")})
            # fmt: skip
        finally:
            lock.release()
        run.update(state="trained", **record_fields(record))
        self.check_metrics(run)
        print(f"{head} done in {duration(record['seconds'])}, " + ", ".join(
            f"{k} {record['bbox'][k]:.1f}" for k in self.metrics), flush=True)  # fmt: skip
        if self.after_run is None:
            self.write_results(time.perf_counter() - start, charts=False)
        else:  # it writes the result files itself (and publishes them)
            self.after_run(self.result(time.perf_counter() - start))

    def print_plan(self):
        """The plan on the console: arms, seeds, data, teacher and every run's state."""
        print_plan(self)


def is_part(spec, args) -> bool:
    """Whether ``args`` run a part of the arms file's bench: some of its arms (``--arms``) or
    some of its seeds (``--seeds``, a strict subset)."""
    seeds = getattr(args, "seeds", None)
    subset = bool(seeds) and set(seeds) < set(spec.seeds or [0])
    return bool(getattr(args, "arms", None)) or subset


def whole_bench(spec, args, arms_file="(arms)") -> Bench:
    """The bench of every arm of ``spec`` for its seeds and those of ``--seeds``: what a process
    that ran a part of it (``--arms`` / ``--seeds``) reports, so that processes sharing an output
    folder do not overwrite each other's results."""
    whole = copy.copy(args)
    whole.arms = None
    whole.seeds = sorted(set(spec.seeds or [0]) | set(args.seeds or []))
    return Bench(spec, whole, arms_file)


def report(bench, spec, args, arms_file, ran):
    """The results of the whole bench as far as it is finished, after ``bench`` (all of it or a
    part, ``--arms`` / ``--seeds``) ran: the result files in OUTPUT, the learning curves with
    ``--curves``, their copies in ``--publish`` DIR. Returns (result dict, file names)."""
    whole = whole_bench(spec, args, arms_file) if is_part(spec, args) else bench
    names = list(RESULT_FILES)
    with publish_lock(getattr(args, "publish", None)):  # processes sharing DIR take turns
        result = whole.report_only(ran=ran)
        if getattr(args, "curves", False):
            write_curves(result, whole.output, args.python, args.results_from)
            names += CURVE_FILES
        if getattr(args, "publish", None):
            publish(whole.output, args.publish, result, names)
    return result, names


def run_bench(spec, args, arms_file="(arms)"):
    """Check, run and report a bench; returns the result dict (None for --dry-run)."""
    import kd_detr  # noqa: F401  (first: registers everything, quiets fvcore's import warning)

    bench = Bench(spec, args, arms_file)
    bench.print_plan()
    check_publish_target(getattr(args, "publish", None), bench.output, args.results_from)
    if args.dry_run:
        return None
    if getattr(args, "teacher_only", False):
        bench.ensure_teacher()
        bbox = (bench.teacher or {}).get("bbox")
        if bbox:
            print("[kd_bench] teacher: " + ", ".join(f"{k} {bbox[k]:.1f}" for k in METRICS))
        return None
    if getattr(args, "report_only", False):
        ran = None
    else:
        if getattr(args, "publish", None):  # refreshed after every run this process trains
            bench.after_run = lambda ran: report(bench, spec, args, arms_file, ran)
        ran = bench.run_all()
    result, names = report(bench, spec, args, arms_file, ran)
    print_tables(result)
    for name in names:
        print(f"wrote {os.path.join(bench.output, name)}")
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        spec = load_arms(args.arms_file)
        return run_bench(spec, args, args.arms_file)
    except (BenchError, RuntimeError) as e:
        print(f"kd_bench: error: {e}", file=sys.stderr)
        raise SystemExit(2)


__all__ = ["Arm", "Bench", "BenchError", "flat_opts", "main", "run_bench"]

if __name__ == "__main__":
    main()
