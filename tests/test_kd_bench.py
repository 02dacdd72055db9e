# Copyright (c) kd_detr contributors.
"""The KD bench (tools/kd_bench.py): arms files, dataset switch, resume, statistics, bad input."""
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import unittest

import pytest

from .common import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import kd_bench  # noqa: E402
from bench import (  # noqa: E402; fmt: skip
    BenchError,
    config_hash,
    load_arms,
    paired_difference,
    resolve_config,
)
from bench.stats import arm_stats  # noqa: E402

STUDENT = "configs/demo/dab_detr_efflite0_demo.yaml"
KD = "configs/kd_detr/kd_dab_detr_efflite0_from_efflite2_demo.yaml"
TEACHER = "configs/demo/dab_detr_efflite2_demo.yaml"
# Tiny images, batches and loaders: a run of 2 iterations takes seconds.
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.DETR.NUM_QUERIES", "10", "MODEL.KD.GENERAL.NUM_POINTS", "10",
]  # fmt: skip
TINY_TEACHER = TINY[:14]  # without the KD key


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def _arms_file(folder, student_opts="[]", iters=2):
    return _write(
        os.path.join(folder, "arms.yaml"),
        f"teacher: {{config: {TEACHER}, iters: 2}}\niters: {iters}\nseeds: [0]\n"
        "baseline: no_kd\narms:\n"
        f"  - {{name: no_kd, config: {STUDENT}, opts: {student_opts}}}\n"
        f"  - {{name: kd, config: {KD}}}\n",
    )


def _images(folder, names):
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        image = Image.new("RGB", (80, 64), (30, 30, 30))
        ImageDraw.Draw(image).rectangle([10 + i, 12, 40 + i, 50], fill=(200, 60 + 40 * i, 60))
        image.save(os.path.join(folder, name))


def _coco_dataset(folder):
    """A 4-image COCO json with 2 classes (ids 1 and 3: class ids need not be contiguous)."""
    names = [f"{i}.jpg" for i in range(4)]
    _images(os.path.join(folder, "images"), names)
    content = {
        "images": [{"id": i + 1, "file_name": n, "width": 80, "height": 64}
                   for i, n in enumerate(names)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1 + 2 * (i % 2),
                         "bbox": [10 + i, 12, 30, 38], "area": 1140, "iscrowd": 0}
                        for i in range(4)],
        "categories": [{"id": 1, "name": "cell"}, {"id": 3, "name": "debris"}],
    }  # fmt: skip
    return _write(os.path.join(folder, "instances.json"), json.dumps(content))


def _voc_dataset(folder):
    """A 4-image Pascal-VOC folder with 3 classes, splits train (3 images) and test (1)."""
    ids = [f"img{i}" for i in range(4)]
    _images(os.path.join(folder, "JPEGImages"), [f"{i}.jpg" for i in ids])
    for i, file_id in enumerate(ids):
        name = ("a", "b", "c")[i % 3]
        _write(
            os.path.join(folder, "Annotations", f"{file_id}.xml"),
            f"<annotation><filename>{file_id}.jpg</filename><size><width>80</width>"
            f"<height>64</height><depth>3</depth></size><object><name>{name}</name>"
            f"<difficult>0</difficult><bndbox><xmin>{11 + i}</xmin><ymin>13</ymin>"
            f"<xmax>{40 + i}</xmax><ymax>50</ymax></bndbox></object></annotation>",
        )
    _write(os.path.join(folder, "ImageSets", "Main", "train.txt"), "\n".join(ids[:3]) + "\n")
    _write(os.path.join(folder, "ImageSets", "Main", "test.txt"), ids[3] + "\n")
    return folder


def _main(argv):
    """kd_bench.main in-process; returns (result or None, stdout, stderr, exit code)."""
    out, err = io.StringIO(), io.StringIO()
    code, result = 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = kd_bench.main(argv)
        except SystemExit as e:
            code = e.code
    return result, out.getvalue(), err.getvalue(), code


class TestArmsFile(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kd_bench_")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def test_mapping_and_list_forms(self):
        spec = load_arms(
            _write(
                os.path.join(self.tmp, "a.yaml"),
                "teacher: {config: t.yaml, iters: 9, opts: {MODEL.DETR.NUM_QUERIES: 20}}\n"
                "iters: 5\nseeds: 3\nbaseline: b\narms:\n"
                "  - {name: b, config: s.yaml}\n"
                "  - {name: k, config: k.yaml, opts: [MODEL.KD.POINTS, inconsistent],"
                " label: 'KD'}\n"
                "  - {name: f, config: k.yaml, opts: {MODEL.KD.FOREGROUND_WEIGHTS: false}}\n",
            )
        )
        self.assertEqual([a.name for a in spec.arms], ["b", "k", "f"])
        self.assertEqual(spec.arms[1].opts, ["MODEL.KD.POINTS", "inconsistent"])
        self.assertEqual(spec.arms[1].title, "KD")
        self.assertEqual(spec.arms[2].opts, ["MODEL.KD.FOREGROUND_WEIGHTS", "False"])
        self.assertEqual((spec.iters, spec.seeds, spec.baseline), (5, [3], "b"))
        self.assertEqual(spec.teacher_opts, ["MODEL.DETR.NUM_QUERIES", "20"])
        plain = load_arms(_write(os.path.join(self.tmp, "b.yaml"), "- {name: x, config: s.yaml}\n"))
        self.assertEqual((plain.arms[0].config, plain.iters), ("s.yaml", None))

    def test_repository_arms_files_parse(self):
        names = ("demo.yaml", "kd_detr_ablation.yaml", "ema_demo.yaml", "incremental_demo.yaml")
        for name in names:
            spec = load_arms(os.path.join(REPO_ROOT, "configs", "bench", name))
            for arm in spec.arms:
                self.assertTrue(os.path.isfile(os.path.join(REPO_ROOT, arm.config)), arm)
        ablation = load_arms(os.path.join(REPO_ROOT, "configs", "bench", "kd_detr_ablation.yaml"))
        self.assertGreaterEqual(len(ablation.seeds), 3)
        self.assertEqual(len(ablation.arms), 8)

    def test_bad_arms_are_named(self):
        cases = {
            "- {name: x}\n": "arm 'x' has no 'config'",
            "- {name: x, config: a.yaml}\n- {name: x, config: b.yaml}\n": "unique",
            "- {name: 'a b', config: a.yaml}\n": "'name' must be",
            "- {name: x, config: a.yaml, opts: [ONLY_KEY]}\n": "KEY VALUE pairs",
            "- {name: x, config: a.yaml, seed: 1}\n": "unknown key",
            "arms: []\n": "no arms",
        }
        for text, message in cases.items():
            with self.assertRaises(BenchError) as ctx:
                load_arms(_write(os.path.join(self.tmp, "bad.yaml"), text))
            self.assertIn(message, str(ctx.exception))


class TestConfigHash(unittest.TestCase):
    def test_only_values_that_differ_from_the_defaults_count(self):
        """A key added by later code at its default keeps every hash (cached teachers stay
        valid); a changed value changes it."""
        from bench import runs

        cfg = resolve_config(STUDENT)
        before = config_hash(cfg)
        runs.config_hash(cfg)  # fills the defaults
        saved = dict(runs._DEFAULTS)
        self.addCleanup(lambda: (runs._DEFAULTS.clear(), runs._DEFAULTS.update(saved)))
        runs._DEFAULTS["MODEL.KD.NEW_METHOD.WEIGHT"] = 1.0
        grown = cfg.clone()
        grown.defrost()
        grown.MODEL.KD.NEW_METHOD = type(cfg)({"WEIGHT": 1.0})
        self.assertEqual(config_hash(grown), before)
        grown.MODEL.KD.NEW_METHOD.WEIGHT = 2.0
        self.assertNotEqual(config_hash(grown), before)
        self.assertNotEqual(config_hash(cfg, teacher_key="abc"), before)


class TestStatistics(unittest.TestCase):
    def test_against_scipy(self):
        import numpy as np
        from scipy import stats

        arm = {0: 41.0, 1: 43.5, 2: 40.2, 3: 44.0}
        base = {0: 38.0, 1: 39.0, 2: 39.5, 3: 40.5, 4: 12.0}  # seed 4 has no pair: left out
        diff = paired_difference(arm, base)
        d = np.array([arm[s] - base[s] for s in range(4)])
        low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        self.assertEqual(diff["n"], 4)
        self.assertAlmostEqual(diff["mean"], d.mean())
        self.assertAlmostEqual(diff["std"], d.std(ddof=1))
        self.assertAlmostEqual(diff["low"], low)
        self.assertAlmostEqual(diff["high"], high)
        # The interval excludes 0 exactly when the paired t-test rejects at 5%.
        p = stats.ttest_rel([arm[s] for s in range(4)], [base[s] for s in range(4)]).pvalue
        self.assertEqual(p < 0.05, low > 0 or high < 0)
        one = arm_stats(list(arm.values()))
        self.assertAlmostEqual(one["std"], np.std(list(arm.values()), ddof=1))
        self.assertTrue(np.isnan(paired_difference({0: 1.0}, {0: 0.5})["low"]))


class TestMetrics(unittest.TestCase):
    """``metrics:`` of an arms file: the tables report those box metrics (e.g. the incremental
    evaluator's AP-base / AP-novel) with the same statistics as AP."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kd_bench_")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def _bench(self, metrics_line):
        arms = _write(
            os.path.join(self.tmp, "arms.yaml"),
            f"teacher: {{config: {TEACHER}, iters: 2}}\niters: 2\nseeds: [0, 1]\n"
            f"baseline: no_kd\n{metrics_line}arms:\n"
            f"  - {{name: no_kd, config: {STUDENT}}}\n  - {{name: kd, config: {KD}}}\n",
        )
        args = kd_bench.parse_args([arms, "--output", os.path.join(self.tmp, "out"),
                                    "--teacher-cache", "none", "--dry-run"])  # fmt: skip
        return kd_bench.Bench(load_arms(arms), args, arms)

    def test_chosen_metrics_in_summary_and_tables(self):
        from bench import write_markdown

        bench = self._bench("metrics: [AP, AP-novel]\n")
        self.assertEqual(bench.metrics, ("AP", "AP-novel"))
        values = {("no_kd", 0): (40.0, 10.0), ("no_kd", 1): (42.0, 14.0),
                  ("kd", 0): (45.0, 11.0), ("kd", 1): (44.0, 19.0)}  # fmt: skip
        for run in bench.runs:
            ap, novel = values[(run["arm"], run["seed"])]
            run.update(state="finished", seconds=1.0,
                       bbox={"AP": ap, "AP50": 0.0, "AP75": 0.0, "AP-novel": novel})
            bench.check_metrics(run)
        result = bench.result(0.0)
        self.assertEqual(result["metrics"], ["AP", "AP-novel"])
        kd = next(a for a in result["summary"]["arms"] if a["name"] == "kd")
        self.assertAlmostEqual(kd["stats"]["AP-novel"]["mean"], 15.0)
        self.assertAlmostEqual(kd["diff"]["AP-novel"]["mean"], ((11 - 10) + (19 - 14)) / 2)
        self.assertAlmostEqual(kd["diff"]["AP"]["mean"], ((45 - 40) + (44 - 42)) / 2)
        self.assertNotIn("AP50", kd["stats"])
        path = os.path.join(self.tmp, "r.md")
        write_markdown(result, path)
        with open(path) as f:
            text = f.read()
        self.assertIn("AP-novel (mean ± std)", text)
        self.assertIn("| run | seed | AP | AP-novel | seconds |", text)
        self.assertIn("15.0 ± 5.7", text)  # kd's AP-novel: mean 15, std sqrt(32)

    def test_a_metric_the_evaluator_does_not_report_is_named(self):
        bench = self._bench("metrics: [AP, AP-base]\n")
        run = bench.runs[0]
        run.update(bbox={"AP": 1.0, "AP50": 2.0, "AP75": 0.5})
        with self.assertRaises(BenchError) as ctx:
            bench.check_metrics(run)
        for text in ("AP-base", "no_kd", "coco_incremental", "AP75"):
            self.assertIn(text, str(ctx.exception))
        self.assertEqual(self._bench("").metrics, ("AP", "AP50", "AP75"))
        from bench.runs import bbox  # a run's record keeps every finite metric it reported

        final = {"results": {"val": {"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5, "APl": None,
                                              "AP-base": 3.0, "AP-novel": float("nan")}}}}
        self.assertEqual(bbox(final), {"AP": 1.0, "AP50": 2.0, "AP75": 0.5, "AP-base": 3.0})
        with self.assertRaises(BenchError) as ctx:
            load_arms(_write(os.path.join(self.tmp, "bad.yaml"),
                             f"metrics: AP\narms:\n  - {{name: x, config: {STUDENT}}}\n"))
        self.assertIn("'metrics' must be a list", str(ctx.exception))  # fmt: skip


class TestPlan(unittest.TestCase):
    """Planning only (--dry-run): datasets and classes resolved, nothing trained."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kd_bench_")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.arms = _arms_file(self.tmp)

    def _bench(self, extra):
        args = kd_bench.parse_args([self.arms, "--output", os.path.join(self.tmp, "out"),
                                    "--teacher-cache", "none", "--dry-run"] + extra)  # fmt: skip
        return kd_bench.Bench(load_arms(self.arms), args, self.arms)

    def _assert_everywhere(self, bench, dataset, num_classes):
        opts = dict(zip(bench.teacher["opts"][::2], bench.teacher["opts"][1::2]))
        self.assertEqual(opts["MODEL.DETR.NUM_CLASSES"], str(num_classes))
        self.assertIn(dataset, opts["DATASETS.TRAIN"])
        for run in bench.runs:
            opts = dict(zip(run["opts"][::2], run["opts"][1::2]))
            self.assertEqual(opts["MODEL.DETR.NUM_CLASSES"], str(num_classes), run["arm"])
            self.assertIn(dataset, opts["DATASETS.TRAIN"])
            if run["kd"]:
                teacher = eval(opts["MODEL.KD.TEACHER.OPTS"])  # a repr'd list of strings
                t_opts = dict(zip(teacher[::2], teacher[1::2]))
                self.assertEqual(t_opts["MODEL.DETR.NUM_CLASSES"], str(num_classes))
                self.assertIn(dataset, t_opts["DATASETS.TRAIN"])

    def test_registered_name(self):
        bench = self._bench(["--train", "kd_demo_train", "--test", "kd_demo_val"])
        self.assertEqual(len(bench.data.classes), 4)
        self._assert_everywhere(bench, "kd_demo_train", 4)

    def test_voc_class_names(self):
        voc = _voc_dataset(os.path.join(self.tmp, "voc"))
        bench = self._bench(["--train", voc, "--train-split", "train", "--test", voc,
                             "--classes", "a;b;c"])  # fmt: skip
        self.assertEqual(bench.data.classes, ["a", "b", "c"])
        self._assert_everywhere(bench, bench.data.train.name, 3)
        self.assertEqual(bench.runs[0]["classes"], ["a", "b", "c"])

    def test_ema_arm_needs_no_teacher(self):
        arms = os.path.join(REPO_ROOT, "configs", "bench", "ema_demo.yaml")
        args = kd_bench.parse_args([arms, "--output", os.path.join(self.tmp, "out"), "--dry-run"])
        bench = kd_bench.Bench(load_arms(arms), args, arms)
        self.assertIsNone(bench.teacher)  # nothing to train or load
        ema = [run for run in bench.runs if run["arm"] == "student_ema"]
        self.assertEqual(len(ema), 2)
        for run in ema:
            opts = dict(zip(run["opts"][::2], run["opts"][1::2]))
            self.assertFalse(run["kd"])  # does not use the bench's teacher
            self.assertNotIn("MODEL.KD.TEACHER.CONFIG_FILE", opts)
            self.assertTrue(resolve_config(run["config"], run["opts"]).MODEL.KD.TEACHER.EMA.ENABLED)
        # With an external-teacher arm added, only that arm gets the teacher.
        spec = load_arms(self.arms)
        spec.arms.append(load_arms(arms).arms[1])
        args = kd_bench.parse_args([self.arms, "--output", os.path.join(self.tmp, "o2"),
                                    "--teacher-cache", "none", "--dry-run"])  # fmt: skip
        bench = kd_bench.Bench(spec, args, self.arms)
        self.assertIsNotNone(bench.teacher)
        kd = {run["arm"]: run["kd"] for run in bench.runs}
        self.assertEqual(kd, {"no_kd": False, "kd": True, "student_ema": False})

    def test_incremental_arms_start_from_the_teacher(self):
        arms = os.path.join(REPO_ROOT, "configs", "bench", "incremental_demo.yaml")
        args = kd_bench.parse_args([arms, "--output", os.path.join(self.tmp, "out"),
                                    "--teacher-cache", "none", "--dry-run"])  # fmt: skip
        bench = kd_bench.Bench(load_arms(arms), args, arms)
        base = "configs/incremental/dab_detr_efflite0_base_demo.yaml"
        self.assertEqual(bench.teacher["config"], base)
        self.assertEqual(len(bench.runs), 4)
        for run in bench.runs:
            opts = dict(zip(run["opts"][::2], run["opts"][1::2]))
            self.assertEqual(opts["MODEL.WEIGHTS"], bench.teacher["weights"], run["arm"])
            self.assertTrue(run["kd"])  # both use the bench's teacher
            kd = "MODEL.KD.TEACHER.WEIGHTS" in opts
            self.assertEqual(kd, run["arm"] == "incremental_kd")
        with self.assertRaisesRegex(BenchError, "'init_from_teacher' must be true or false"):
            load_arms(_write(os.path.join(self.tmp, "bad.yaml"),
                             "- {name: a, config: s.yaml, init_from_teacher: 1}\n"))  # fmt: skip

    def test_bad_input_stops_before_training(self):
        coco = _coco_dataset(os.path.join(self.tmp, "coco"))
        fake_weights = _write(os.path.join(self.tmp, "teacher.pth"), "")
        missing = _write(os.path.join(self.tmp, "missing.yaml"),
                         "- {name: no_kd, config: configs/demo/nope.yaml}\n")  # fmt: skip
        cases = [
            ([missing], "arm 'no_kd': config 'configs/demo/nope.yaml' not found"),
            ([self.arms, "--train", "/no/such/data", "--test", "kd_demo_val"],
             "--train '/no/such/data' does not resolve"),
            ([self.arms, "--train", os.path.dirname(coco), "--test", coco],
             "--train"),
            ([self.arms, "--train", _voc_dataset(os.path.join(self.tmp, "v")), "--test", coco],
             "set --train-split to one of ['test', 'train']"),
            ([self.arms, "--train", os.path.join(self.tmp, "v"), "--train-split", "train",
              "--test", coco], "give its class names with --classes"),
            ([self.arms, "--train", coco, "--test", "kd_demo_val"], "different classes"),
            # A trained 4-class teacher on 2-class data: the KD arm is named.
            ([self.arms, "--train", coco, "--test", coco, "--teacher-weights", fake_weights],
             "arm 'kd': the teacher (configs/demo/dab_detr_efflite2_demo.yaml) has 4 classes"),
        ]  # fmt: skip
        out = os.path.join(self.tmp, "out")
        for argv, message in cases:
            _, stdout, stderr, code = _main(argv + ["--output", out, "--teacher-cache", "none"])
            self.assertEqual(code, 2, stdout + stderr)
            self.assertIn(message, stderr)
            self.assertFalse(os.path.exists(out), "nothing may be trained or written")


@pytest.mark.slow
class TestTinyRuns(unittest.TestCase):
    """Teacher + 2 students, 2 iterations on 64-pixel images, on a COCO json and a VOC folder."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kd_bench_")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def _run(self, arms, extra):
        argv = [arms, "--output", os.path.join(self.tmp, "out"), "--teacher-cache", "none",
                "--teacher-opts", *TINY_TEACHER] + extra + ["--", *TINY]  # fmt: skip
        result, stdout, stderr, code = _main(argv)
        self.assertEqual(code, 0, stdout[-3000:] + stderr[-3000:])
        return result, stdout

    def _config(self, run):
        import yaml

        with open(os.path.join(self.tmp, "out", run, "config.yaml")) as f:
            return yaml.safe_load(f)

    def test_coco_json_all_models_and_resume(self):
        coco = _coco_dataset(os.path.join(self.tmp, "coco"))
        arms = _arms_file(self.tmp)
        data = ["--train", coco, "--test", coco]
        result, stdout = self._run(arms, data)
        self.assertEqual(result["data"]["classes"], ["cell", "debris"])
        self.assertEqual(result["teacher"]["state"], "trained")
        self.assertEqual(self._config("teacher")["MODEL"]["DETR"]["NUM_CLASSES"], 2)
        for run in ("no_kd_seed0", "kd_seed0"):
            self.assertEqual(self._config(run)["MODEL"]["DETR"]["NUM_CLASSES"], 2)
        # The KD run's teacher: same data and class count.
        opts = self._config("kd_seed0")["MODEL"]["KD"]["TEACHER"]["OPTS"]
        opts = dict(zip(opts[::2], opts[1::2]))
        self.assertEqual(opts["MODEL.DETR.NUM_CLASSES"], "2")
        self.assertIn("bench_train_", opts["DATASETS.TRAIN"])
        self.assertIn(coco, opts["DATASETS.COCO_JSON"])
        for name in ("bench_results.json", "bench_results.md", "bench_ap.png"):
            self.assertTrue(os.path.isfile(os.path.join(self.tmp, "out", name)), name)
        for text in ("teacher", "no_kd", "whole job", "per arm"):
            self.assertIn(text, stdout)
        hashes = {r["arm"]: r["hash"] for r in result["runs"]}

        # Again: the teacher and both runs are finished, nothing trains.
        again, stdout = self._run(arms, data)
        self.assertEqual(again["teacher"]["state"], "cached")
        self.assertEqual([r["state"] for r in again["runs"]], ["finished", "finished"])
        self.assertIn("skipped", stdout)

        # The no-KD arm changed, the KD run was interrupted (no record): both rerun.
        arms = _arms_file(self.tmp, student_opts="[MODEL.DETR.DEC_LAYERS, 2]")
        os.remove(os.path.join(self.tmp, "out", "kd_seed0", "bench_run.json"))
        third, _ = self._run(arms, data)
        states = {r["arm"]: (r["state"], r["hash"]) for r in third["runs"]}
        self.assertEqual(states["kd"], ("trained", hashes["kd"]))
        self.assertEqual(states["no_kd"][0], "trained")
        self.assertNotEqual(states["no_kd"][1], hashes["no_kd"])
        self.assertEqual(self._config("no_kd_seed0")["MODEL"]["DETR"]["DEC_LAYERS"], 2)

        # A new checkout (empty output folder) with --results-from the committed results: the
        # teacher is trained again (CPU training is deterministic: the same weights sha256), the
        # runs with the same hash and teacher weights are taken over, no student trains.
        earlier = os.path.join(self.tmp, "earlier_results.json")
        shutil.copy(os.path.join(self.tmp, "out", "bench_results.json"), earlier)
        shutil.rmtree(os.path.join(self.tmp, "out"))
        fourth, stdout = self._run(arms, data + ["--results-from", earlier])
        self.assertEqual(fourth["teacher"]["weights_sha256"], third["teacher"]["weights_sha256"])
        self.assertEqual([r["state"] for r in fourth["runs"]], ["imported", "imported"])
        self.assertEqual([r["bbox"] for r in fourth["runs"]], [r["bbox"] for r in third["runs"]])
        self.assertIn("2 finished run(s) taken over", stdout)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "out", "kd_seed0")))
        # Results of another teacher (weights sha256 differs): the KD run trains again.
        with open(earlier) as f:
            content = json.load(f)
        content["teacher"]["weights_sha256"] = "0" * 64
        # ... and named otherwise there: a run is found by seed and config hash, not arm name.
        for run in content["runs"]:
            run["arm"] = "student" if run["arm"] == "no_kd" else run["arm"]
        _write(earlier, json.dumps(content))
        shutil.rmtree(os.path.join(self.tmp, "out"))
        fifth, stdout = self._run(arms, data + ["--results-from", earlier])
        self.assertEqual({r["arm"]: r["state"] for r in fifth["runs"]},
                         {"no_kd": "imported", "kd": "trained"})  # fmt: skip
        self.assertIn("1 KD run(s) not (another teacher", stdout)
        # --report-only trains nothing: finished runs in OUTPUT are reported (the KD run of
        # the fifth bench), the rest (no_kd, taken over there, not here) as not run.
        report, _ = self._run(arms, data + ["--report-only"])
        self.assertEqual({r["arm"]: r["state"] for r in report["runs"]},
                         {"no_kd": None, "kd": "finished"})  # fmt: skip
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "out", "no_kd_seed0")))
        # A part of the bench (--arms): only no_kd trains, the results still hold the KD run
        # finished before (processes running parts of one bench share its result files).
        part, _ = self._run(arms, data + ["--arms", "no_kd"])
        self.assertEqual({r["arm"]: r["state"] for r in part["runs"]},
                         {"no_kd": "finished", "kd": "finished"})  # fmt: skip
        self.assertGreater(part["job_seconds"], 0)  # the part's own time, its teacher record
        self.assertEqual(part["teacher"]["weights_sha256"], fifth["teacher"]["weights_sha256"])
        with open(os.path.join(self.tmp, "out", "bench_results.json")) as f:
            self.assertEqual(len(json.load(f)["runs"]), 2)

    def test_voc_folder_with_class_names(self):
        voc = _voc_dataset(os.path.join(self.tmp, "voc"))
        result, _ = self._run(
            _arms_file(self.tmp),
            ["--train", voc, "--train-split", "train", "--test", voc, "--classes", "a;b;c"],
        )
        self.assertEqual(result["data"]["classes"], ["a", "b", "c"])
        for run in ("teacher", "no_kd_seed0", "kd_seed0"):
            self.assertEqual(self._config(run)["MODEL"]["DETR"]["NUM_CLASSES"], 3, run)
            self.assertTrue(self._config(run)["DATASETS"]["VOC"][0].endswith(",train,a;b;c"))
        opts = self._config("kd_seed0")["MODEL"]["KD"]["TEACHER"]["OPTS"]
        self.assertIn(",train,a;b;c", opts[opts.index("DATASETS.VOC") + 1])


if __name__ == "__main__":
    unittest.main()
