# Copyright (c) kd_detr contributors.
"""Learning curves of a KD bench (tools/bench/curves.py, ``kd_bench.py --curves``): per-checkpoint
means and paired differences against numpy / scipy, the late-training value, claims on it, the
checkpoint cache, committed curves of runs without a folder, the files written."""
import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

import numpy as np
from scipy import stats

from .common import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
from bench.curves import (  # noqa: E402
    CURVE_FILE,
    curve_summary,
    evaluate_run_checkpoints,
    write_curves,
)
from bench.loss_share import kd_loss_share  # noqa: E402

ITERS = 6
SEEDS = (0, 1, 2)


def _ap(arm, seed, iteration):
    """A made-up AP: arm b is 1 above arm a late in training, with seed noise."""
    gain = 1.0 if arm == "b" and iteration > 4 else 0.0
    return 0.5 * iteration + 0.3 * seed * seed + gain + (0.2 * seed if arm == "b" else 0.0)


def _result(out_dirs):
    runs = [{"arm": arm, "seed": seed, "hash": f"h{arm}", "bbox": {"AP": 1.0},
             "out_dir": out_dirs.get((arm, seed))}
            for arm in ("a", "b") for seed in SEEDS]  # fmt: skip
    claims = [{"better": "b", "than": "a"}]
    return {"arms_file": "arms.yaml", "iters": ITERS, "runs": runs,
            "arms": [{"name": "a"}, {"name": "b"}], "teacher": {"bbox": {"AP": 9.0}},
            "summary": {"baseline": "a", "claims": claims}}  # fmt: skip


def _checkpoint_cache(out_dir, arm, seed):
    """The files a run folder has after tools/eval_checkpoints.py: checkpoints, config, cache."""
    os.makedirs(out_dir, exist_ok=True)
    for it in (2, 4, 6):
        open(os.path.join(out_dir, f"model_{it - 1:07d}.pth"), "w").close()
    open(os.path.join(out_dir, "config.yaml"), "w").close()
    entries = [{"file": f"model_{it - 1:07d}.pth", "iteration": it,
                "results": {"test_set": {"bbox": {"AP": _ap(arm, seed, it)}}}}
               for it in (2, 4, 6)]  # fmt: skip
    with open(os.path.join(out_dir, CURVE_FILE), "w") as f:
        json.dump({"checkpoints": entries}, f)


def _curve(arm, seed):
    return [{"iteration": it, "AP": _ap(arm, seed, it)} for it in (2, 4, 6)]


class CurveSummaryTest(unittest.TestCase):
    def test_means_paired_differences_and_late_values_against_numpy_and_scipy(self):
        curves = {(arm, s): _curve(arm, s) for arm in ("a", "b") for s in SEEDS}
        summary = curve_summary(_result({}), curves)
        self.assertEqual([r["iteration"] for r in summary["per_checkpoint"]], [2, 4, 6])
        for row in summary["per_checkpoint"]:
            it = row["iteration"]
            a = np.array([_ap("a", s, it) for s in SEEDS])
            b = np.array([_ap("b", s, it) for s in SEEDS])
            self.assertAlmostEqual(row["arms"]["b"]["mean"], b.mean(), places=12)
            self.assertAlmostEqual(row["arms"]["b"]["std"], b.std(ddof=1), places=12)
            diff = row["arms"]["b"]["diff"]
            self.assertAlmostEqual(diff["mean"], (b - a).mean(), places=12)
            low, high = stats.t.interval(0.95, 2, loc=(b - a).mean(), scale=stats.sem(b - a))
            self.assertAlmostEqual(diff["low"], low, places=9)
            self.assertAlmostEqual(diff["high"], high, places=9)
        # Late training: checkpoints after 2/3 of 6 iterations, i.e. 6 only (4 is not after 4).
        self.assertEqual(summary["late_after"], 4.0)
        late = {arm["name"]: arm for arm in summary["late"]}
        expected = np.array([_ap("b", s, 6) for s in SEEDS])
        self.assertAlmostEqual(late["b"]["mean"], expected.mean(), places=12)
        gain = expected - np.array([_ap("a", s, 6) for s in SEEDS])
        self.assertAlmostEqual(late["b"]["diff"]["mean"], gain.mean(), places=12)
        # b - a = 1 + 0.2 seed late: interval above 0, the claim "b above a" agrees.
        claim = summary["claims"][0]
        self.assertEqual((claim["better"], claim["than"], claim["diff"]["n"]), ("b", "a", 3))
        self.assertEqual(claim["verdict"], "agrees" if stats.ttest_rel(
            expected, expected - gain).pvalue < 0.05 else "unresolved, same sign")  # fmt: skip

    def test_group_claim_on_late_values(self):
        """A claim whose side lists arms compares each seed's mean over them (late values)."""
        curves = {(arm, s): _curve(arm, s) for arm in ("a", "b") for s in SEEDS}
        curves.update({("c", s): [{"iteration": 6, "AP": 10.0 + s}] for s in (0, 1)})
        result = _result({})
        result["arms"].append({"name": "c"})
        result["summary"]["claims"] = [{"better": ["b", "c"], "than": "a"}]
        claim = curve_summary(result, curves)["claims"][0]
        group = np.array([(_ap("b", s, 6) + 10.0 + s) / 2 for s in (0, 1)])  # c lacks seed 2
        base = np.array([_ap("a", s, 6) for s in (0, 1)])
        self.assertEqual(claim["diff"]["seeds"], [0, 1])
        self.assertAlmostEqual(claim["diff"]["mean"], (group - base).mean(), places=12)
        self.assertEqual(claim["better"], ["b", "c"])

    def test_late_value_averages_the_last_third(self):
        curve = [{"iteration": it, "AP": float(it)} for it in (100, 200, 300, 400, 500, 600)]
        result = _result({})
        result["iters"] = 600
        summary = curve_summary(result, {("a", 0): curve})
        late = {arm["name"]: arm for arm in summary["late"]}
        self.assertAlmostEqual(late["a"]["mean"], (500 + 600) / 2)  # after iteration 400
        self.assertEqual(late["b"]["n"], 0)


def _metrics_json(out_dir, kd_scale):
    """Detectron2's metrics.json of a 120-iteration run logged every 20 iterations, the
    evaluation line at the end: detection losses 1 + 0.5 (iteration 119: 2 + 0.5), KD losses
    kd_scale x (0.25 + 0.75)."""
    lines = []
    for it in range(19, 120, 20):
        det = 2.0 if it == 119 else 1.0
        lines.append({"iteration": it, "loss_class": det, "loss_bbox": 0.5, "lr": 1e-4,
                      "loss_kd_cls": 0.25 * kd_scale, "loss_kd_bbox": 0.75 * kd_scale,
                      "total_loss": det + 0.5 + kd_scale})  # fmt: skip
    lines.append({"iteration": 120, "bbox/AP": 3.0})
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n")


class LossShareTest(unittest.TestCase):
    def test_last_fifth_against_hand_computed_means(self):
        with tempfile.TemporaryDirectory() as tmp:
            _metrics_json(tmp, kd_scale=2.0)
            # After 96 of 120 iterations: the lines of iterations 99 and 119 (100 and 120 done).
            share = kd_loss_share(tmp, 120)
            self.assertAlmostEqual(share["detection"], (1.5 + 2.5) / 2)
            self.assertAlmostEqual(share["kd"], 2.0)
            self.assertAlmostEqual(share["share"], 2.0 / 4.0)
            share = kd_loss_share(tmp, 120, last_fraction=1.0)  # every training line
            self.assertAlmostEqual(share["detection"], (5 * 1.5 + 2.5) / 6)
            self.assertIsNone(kd_loss_share(tmp, 120, last_fraction=0.0))
            self.assertIsNone(kd_loss_share(os.path.join(tmp, "none"), 120))


class WriteCurvesTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def test_cached_runs_committed_curves_and_missing_runs(self):
        out_dirs = {}
        for arm in ("a", "b"):
            for seed in SEEDS:
                out_dirs[(arm, seed)] = os.path.join(self.tmp, f"{arm}_seed{seed}")
                _checkpoint_cache(out_dirs[(arm, seed)], arm, seed)
        # b seed 2: no folder, its curve and loss share in a committed bench_curves.json beside
        # --results-from.
        out_dirs[("b", 2)] = os.path.join(self.tmp, "gone")
        committed = os.path.join(self.tmp, "docs")
        os.makedirs(committed)
        committed_share = {"detection": 1.0, "kd": 1.0, "share": 0.5}
        with open(os.path.join(committed, "bench_curves.json"), "w") as f:
            json.dump({"runs": [{"arm": "b", "seed": 2, "hash": "hb", "curve": _curve("b", 2),
                                 "loss_share": committed_share}]}, f)  # fmt: skip
        _metrics_json(out_dirs[("b", 0)], kd_scale=2.0)
        # a seed 2: no folder and no committed curve: left out with a warning.
        out_dirs[("a", 2)] = None
        result = _result(out_dirs)
        output = os.path.join(self.tmp, "bench")
        os.makedirs(output)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            summary = write_curves(result, output, python="/nonexistent/python",
                                   results_from=[os.path.join(committed, "x.json")])  # fmt: skip
        self.assertIn("1 finished run(s) without a curve, left out: a seed 2 (no folder)",
                      stdout.getvalue())  # fmt: skip
        last = summary["per_checkpoint"][-1]["arms"]
        self.assertEqual(sorted(last["b"]["values"]), [0, 1, 2])
        self.assertEqual(sorted(last["a"]["values"]), [0, 1])
        self.assertEqual(last["b"]["diff"]["seeds"], [0, 1])
        with open(os.path.join(output, "bench_curves.json")) as f:
            written = json.load(f)
        self.assertEqual(len(written["runs"]), 5)
        shares = {(r["arm"], r["seed"]): r["loss_share"] for r in written["runs"]}
        self.assertEqual(shares[("b", 2)], committed_share)  # kept for the next session
        self.assertAlmostEqual(shares[("b", 0)]["share"], 2.0 / (2.0 + 5.0 / 3.0))
        self.assertIsNone(shares[("a", 0)])
        with open(os.path.join(output, "bench_curves.md")) as f:
            markdown = f.read()
        self.assertIn(f"| 6 | {np.mean([_ap('a', s, 6) for s in (0, 1)]):.1f} (2) |", markdown)
        self.assertIn("| b > a | 2 |", markdown)
        # Run of ITERS = 6 iterations: every line of the 120-iteration log is in its last fifth.
        # b: seed 0 from its metrics.json, seed 2 the committed share; a: no metrics.json.
        b_share = (2.0 / (2.0 + 5.0 / 3.0) + 0.5) / 2
        self.assertIn(f"| b | 2 | 1.333 | 1.500 | {100 * b_share:.0f}% |", markdown)
        self.assertNotIn("| a | ", markdown.split("KD share")[1].split("\n\n")[0])
        with open(os.path.join(output, "bench_curves.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_evaluates_only_when_checkpoints_are_newer_than_the_cache(self):
        out_dir = os.path.join(self.tmp, "run")
        _checkpoint_cache(out_dir, "a", 0)
        run = {"out_dir": out_dir}
        self.assertEqual(evaluate_run_checkpoints(run, "/nonexistent/python"), "cached")
        os.utime(os.path.join(out_dir, CURVE_FILE), (1, 1))  # older than the checkpoints
        fake = os.path.join(self.tmp, "fake_python")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho \"$@\" > \"$2/called\"\n")
        os.chmod(fake, 0o755)
        self.assertEqual(evaluate_run_checkpoints(run, fake), "evaluated")
        with open(os.path.join(out_dir, "called")) as f:
            self.assertTrue(f.read().split()[0].endswith("tools/eval_checkpoints.py"))
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho boom\nexit 3\n")
        with self.assertRaisesRegex(RuntimeError, "eval_checkpoints.log"):
            evaluate_run_checkpoints(run, fake)
        with open(os.path.join(out_dir, "eval_checkpoints.log")) as f:
            self.assertIn("boom", f.read())
        self.assertEqual(evaluate_run_checkpoints({"out_dir": None}, fake), "no folder")
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        open(os.path.join(empty, "config.yaml"), "w").close()
        self.assertEqual(evaluate_run_checkpoints({"out_dir": empty}, fake), "no checkpoint")


if __name__ == "__main__":
    unittest.main()
