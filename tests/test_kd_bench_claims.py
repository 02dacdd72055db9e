# Copyright (c) kd_detr contributors.
"""Claims of a KD bench (arms file ``claims:``): orderings such as a paper's, each checked as a
paired difference over seeds with a verdict that follows the paired t-test (scipy)."""
import contextlib
import io
import os
import shutil
import sys
import tempfile
import unittest

from .common import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import kd_bench  # noqa: E402
from bench import BenchError, load_arms, paired_difference  # noqa: E402
from bench.report import print_tables, write_markdown  # noqa: E402
from bench.stats import claim_verdict  # noqa: E402

STUDENT = "configs/demo/dab_detr_efflite0_demo.yaml"
KD = "configs/kd_detr/kd_dab_detr_efflite0_from_efflite2_demo.yaml"
TEACHER = "configs/demo/dab_detr_efflite2_demo.yaml"


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


class TestClaims(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="kd_bench_claims_")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def _arms(self, claims, name="arms.yaml"):
        return _write(
            os.path.join(self.tmp, name),
            f"teacher: {{config: {TEACHER}, iters: 2}}\niters: 2\nseeds: [0, 1, 2]\n"
            f"baseline: no_kd\nmetrics: [AP, AP75]\nclaims:\n{claims}arms:\n"
            f"  - {{name: no_kd, config: {STUDENT}}}\n  - {{name: kd, config: {KD}}}\n"
            f"  - {{name: kd_soft, config: {KD}, opts: [MODEL.KD.TEMPERATURE, '2.0']}}\n",
        )

    def _bench(self, path, *extra):
        args = kd_bench.parse_args([path, "--output", os.path.join(self.tmp, "out"),
                                    "--teacher-cache", "none", "--dry-run", *extra])  # fmt: skip
        return kd_bench.Bench(load_arms(path), args, path)

    def test_parsed_and_reported_with_verdicts(self):
        path = self._arms(
            "  - {better: kd, than: no_kd, source: 'paper, Table 1'}\n"
            "  - {better: kd_soft, than: kd, metric: AP75}\n"
            "  - {better: no_kd, than: kd_soft}\n"
        )
        spec = load_arms(path)
        self.assertEqual([(c.better, c.than, c.metric) for c in spec.claims],
                         [("kd", "no_kd", None), ("kd_soft", "kd", "AP75"),
                          ("no_kd", "kd_soft", None)])  # fmt: skip
        self.assertEqual(spec.claims[0].source, "paper, Table 1")
        bench = self._bench(path)
        values = {"no_kd": [40.0, 42.0, 41.0], "kd": [45.0, 46.5, 44.8], "kd_soft": [44.0, 50.0,
                  40.0]}  # fmt: skip
        for run in bench.runs:
            if run["arm"] == "kd_soft" and run["seed"] == 2:
                continue  # not finished: that claim pairs 2 seeds
            ap = values[run["arm"]][run["seed"]]
            run.update(state="finished", seconds=1.0, bbox={"AP": ap, "AP75": ap - 10})
        bench.runs[0]["resumed_at_iteration"] = 120  # shown beside its seconds
        claims = bench.result(0.0)["summary"]["claims"]
        self.assertEqual([c["verdict"] for c in claims],
                         ["agrees", "unresolved, same sign", "unresolved, opposite sign"])
        first = claims[0]["diff"]
        self.assertEqual((first["n"], claims[0]["metric"]), (3, "AP"))
        self.assertAlmostEqual(first["mean"], (5.0 + 4.5 + 3.8) / 3)
        self.assertEqual((claims[1]["metric"], claims[1]["diff"]["n"]), ("AP75", 2))
        result = bench.result(0.0)
        md = os.path.join(self.tmp, "r.md")
        write_markdown(result, md)
        with open(md) as f:
            text = f.read()
        self.assertIn("| kd > no_kd | AP | 3 | +4.4 [", text)
        self.assertIn("| agrees | paper, Table 1 |", text)
        self.assertIn("| 1.0 (resumed at iteration 120) | - | finished |", text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_tables(result)
        self.assertIn("unresolved, opposite sign", out.getvalue())
        # A part of the bench without one of a claim's arms leaves the claim out.
        part = self._bench(path, "--arms", "no_kd", "kd")
        self.assertEqual([(c["better"], c["than"]) for c in part.result(0.0)["summary"]["claims"]],
                         [("kd", "no_kd")])  # fmt: skip

    def test_group_claims_compare_each_seeds_mean_over_the_group(self):
        """A side listing several arms is compared through each seed's mean over its arms, over
        the seeds every arm of both sides has; checked against scipy's paired t-interval."""
        import numpy as np
        from scipy import stats

        path = self._arms("  - {better: [kd, kd_soft], than: no_kd, source: 'grouped'}\n")
        spec = load_arms(path)
        self.assertEqual((spec.claims[0].better, spec.claims[0].than), (["kd", "kd_soft"], "no_kd"))
        bench = self._bench(path)
        values = {"no_kd": [40.0, 42.0, 41.0, 0], "kd": [45.0, 46.5, 44.8, 0],
                  "kd_soft": [44.0, 50.0, 40.0, 0]}  # fmt: skip
        for run in bench.runs:
            if run["arm"] == "kd" and run["seed"] == 2:
                continue  # seed 2 lacks an arm of the group: left out of the claim
            ap = values[run["arm"]][run["seed"]]
            run.update(state="finished", seconds=1.0, bbox={"AP": ap, "AP75": ap})
        claim = bench.result(0.0)["summary"]["claims"][0]
        group = np.array([(45.0 + 44.0) / 2, (46.5 + 50.0) / 2])
        base = np.array([40.0, 42.0])
        self.assertEqual(claim["diff"]["seeds"], [0, 1])
        self.assertAlmostEqual(claim["diff"]["mean"], (group - base).mean(), places=12)
        low, high = stats.t.interval(0.95, 1, loc=(group - base).mean(),
                                     scale=stats.sem(group - base))  # fmt: skip
        self.assertAlmostEqual(claim["diff"]["low"], low, places=9)
        self.assertAlmostEqual(claim["diff"]["high"], high, places=9)
        md = os.path.join(self.tmp, "group.md")
        write_markdown(bench.result(0.0), md)
        with open(md) as f:
            self.assertIn("| mean(kd, kd_soft) > no_kd | AP | 2 | +5.4 [", f.read())

    def test_bad_claims_are_named(self):
        cases = [
            ("  - {better: kd, than: nope}\n", "claim #1: 'than' must name an arm"),
            ("  - {better: kd, than: kd}\n", "claim #1: 'better' and 'than' share the arm(s)"),
            ("  - {better: [kd, kd_soft], than: [kd, no_kd]}\n", "share the arm(s) ['kd']"),
            ("  - {better: [kd, nope], than: no_kd}\n", "'better' names arms not in the file"),
            ("  - {better: [kd], than: no_kd}\n", "or list two or more different ones"),
            ("  - {better: [kd, kd], than: no_kd}\n", "or list two or more different ones"),
            ("  - {better: kd, than: no_kd, by: 2}\n", "claim #1: unknown key(s) ['by']"),
            ("  - kd > no_kd\n", "claim #1 must be a mapping"),
        ]
        for i, (claims, message) in enumerate(cases):
            with self.assertRaises(BenchError) as ctx:
                load_arms(self._arms(claims, f"bad{i}.yaml"))
            self.assertIn(message, str(ctx.exception))
        path = self._arms("  - {better: kd, than: no_kd, metric: AP50}\n", "metric.yaml")
        with self.assertRaises(BenchError) as ctx:  # before anything trains
            self._bench(path)
        self.assertIn("metric 'AP50' is not one the bench reports ['AP', 'AP75']",
                      str(ctx.exception))  # fmt: skip

    def test_verdict_follows_the_paired_t_test(self):
        """The verdict is decided (agrees / contradicted) exactly when scipy's two-sided paired
        t-test rejects at 5%, with the sign of the mean difference."""
        import numpy as np
        from scipy import stats

        rng = np.random.default_rng(0)
        decided = 0
        for trial in range(200):
            n = int(rng.integers(2, 6))
            base = rng.normal(40, 2, n)
            arm = base + rng.normal(rng.normal(0, 2), 1.5, n)
            diff = paired_difference(dict(enumerate(arm)), dict(enumerate(base)))
            verdict = claim_verdict(diff)
            p = stats.ttest_rel(arm, base).pvalue
            mean = float(np.mean(arm - base))
            if p < 0.05:
                decided += 1
                self.assertEqual(verdict, "agrees" if mean > 0 else "contradicted", trial)
            else:
                sign = "same sign" if mean > 0 else "opposite sign"
                self.assertEqual(verdict, f"unresolved, {sign}", trial)
        self.assertTrue(20 < decided < 180, decided)  # both branches exercised
        self.assertEqual(claim_verdict(paired_difference({0: 2.0}, {0: 1.0})),
                         "unresolved, same sign")  # one seed: no interval  # fmt: skip
        self.assertEqual(claim_verdict(paired_difference({0: 2.0}, {1: 1.0})), "not run yet")

    def test_repository_ablation_claims_parse(self):
        spec = load_arms(os.path.join(REPO_ROOT, "configs", "bench", "kd_detr_ablation.yaml"))
        self.assertGreaterEqual(len(spec.claims), 10)
        self.assertIn(("kd_detr", "no_kd"), [(c.better, c.than) for c in spec.claims])
        consistent = ["general_only", "specific_only", "no_fg_weights", "kd_detr"]
        self.assertIn((consistent, ["inconsistent", "similar_fg", "similar_general"]),
                      [(c.better, c.than) for c in spec.claims])  # fmt: skip


if __name__ == "__main__":
    unittest.main()
