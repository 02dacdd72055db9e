# Copyright (c) kd_detr contributors.
"""The KD-DETR main job (tools/kd_demo.py): teacher cache, schedule, end-to-end table."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import pytest

from .common import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import kd_demo  # noqa: E402

TEACHER = "configs/demo/dab_detr_efflite2_demo.yaml"
# A few images and one data-loader worker keep the end-to-end run short.
SMALL_DATA = [
    "DATASETS.KD_DEMO.NUM_TRAIN", "16", "DATASETS.KD_DEMO.NUM_VAL", "8",
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


class TestKDDemoParts(unittest.TestCase):
    def test_schedule_drops_at_five_sixths(self):
        opts = dict(zip(*[iter(kd_demo.schedule_opts(1500))] * 2))
        self.assertEqual(opts["SOLVER.MAX_ITER"], "1500")
        self.assertEqual(opts["SOLVER.STEPS"], "(1250,)")
        self.assertEqual(dict(zip(*[iter(kd_demo.schedule_opts(6))] * 2))["SOLVER.STEPS"], "(5,)")
        # fvcore needs every milestone below MAX_ITER: a 1-2 iteration run has no drop.
        self.assertEqual(dict(zip(*[iter(kd_demo.schedule_opts(2))] * 2))["SOLVER.STEPS"], "()")
        with self.assertRaises(ValueError):
            kd_demo.schedule_opts(0)

    def test_config_chain_follows_bases(self):
        chain = kd_demo.config_chain(TEACHER)
        self.assertEqual(len(chain), 3)  # Base-EfficientNetLite <- Lite0 demo <- Lite2 demo
        with open(os.path.join(REPO_ROOT, TEACHER)) as f:
            self.assertEqual(chain[-1], f.read())
        self.assertIn("PIXEL_MEAN", chain[0])

    def test_teacher_key_changes_with_config_and_overrides(self):
        base = kd_demo.teacher_key(TEACHER, kd_demo.schedule_opts(1500))
        self.assertEqual(base, kd_demo.teacher_key(TEACHER, kd_demo.schedule_opts(1500)))
        self.assertNotEqual(base, kd_demo.teacher_key(TEACHER, kd_demo.schedule_opts(1000)))
        other = "configs/demo/dab_detr_efflite0_demo.yaml"
        self.assertNotEqual(base, kd_demo.teacher_key(other, kd_demo.schedule_opts(1500)))

    def test_odd_overrides_are_rejected(self):
        with self.assertRaises(SystemExit):
            kd_demo.parse_args(["--", "SOLVER.MAX_ITER"])


@pytest.mark.slow
class TestKDDemoEndToEnd(unittest.TestCase):
    def test_three_models_trained_evaluated_and_teacher_reused(self):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, KD_DETR_DATA=os.path.join(tmp, "data"))
            cmd = [
                sys.executable, "tools/kd_demo.py", "--teacher-iters", "2",
                "--student-iters", "2", "--output", os.path.join(tmp, "out"),
                "--teacher-opts", *SMALL_DATA, "--", *SMALL_DATA,
            ]  # fmt: skip
            first = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            self.assertEqual(first.returncode, 0, first.stdout[-3000:] + first.stderr[-3000:])
            for name in ("teacher", "student, no KD", "student, KD-DETR", "whole job"):
                self.assertIn(name, first.stdout)
            with open(os.path.join(tmp, "out", "kd_demo_results.json")) as f:
                result = json.load(f)
            self.assertFalse(result["teacher"]["cached"])
            self.assertTrue(result["teacher"]["weights"].startswith(env["KD_DETR_DATA"]))
            self.assertTrue(os.path.isfile(result["teacher"]["weights"]))
            (run,) = result["runs"]
            for key in ("no_kd", "kd"):
                self.assertLessEqual({"AP", "AP50", "AP75"}, set(run[key]["bbox"]))
            with open(os.path.join(tmp, "out", "student_kd_seed0", "config.yaml")) as f:
                kd_config = f.read()
            self.assertIn(result["teacher"]["weights"], kd_config)
            mean = result["mean"]["AP"]
            gain = run["kd"]["bbox"]["AP"] - run["no_kd"]["bbox"]["AP"]
            self.assertAlmostEqual(mean["gain"], gain)

            # Again with the same settings: the teacher comes from the cache, not retrained.
            args = kd_demo.parse_args(cmd[2:])
            os.environ["KD_DETR_DATA"], saved = env["KD_DETR_DATA"], os.environ.get("KD_DETR_DATA")
            try:
                weights, metrics, cached = kd_demo.teacher_run(args)
            finally:
                if saved is None:
                    del os.environ["KD_DETR_DATA"]
                else:
                    os.environ["KD_DETR_DATA"] = saved
            self.assertTrue(cached)
            self.assertEqual(weights, result["teacher"]["weights"])
            self.assertEqual(kd_demo.bbox(metrics), result["teacher"]["bbox"])
