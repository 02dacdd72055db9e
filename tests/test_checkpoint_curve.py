# Copyright (c) kd_detr contributors.
"""Learning curves from a run's checkpoints (kd_detr.engine.checkpoint_curve and
tools/eval_checkpoints.py): each checkpoint's evaluation equals ``--eval-only`` of its weights,
the cache evaluates only new or changed checkpoints, the run's own files are left alone."""
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import unittest
from unittest import mock

from detectron2.engine import default_argument_parser

import train_net
from kd_detr.config import load_config
from kd_detr.engine import Trainer, evaluate_checkpoints, list_checkpoints
from kd_detr.engine.checkpoint_curve import CURVE_FILE

from .common import REPO_ROOT, tiny_demo_opts

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import eval_checkpoints  # noqa: E402

CONFIG = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite0_demo.yaml")


def _bbox(payload, iteration):
    entry = next(c for c in payload["checkpoints"] if c["iteration"] == iteration)
    return entry["results"]["kd_demo_val"]["bbox"]


class CheckpointCurveTest(unittest.TestCase):
    """A 6-iteration run with a checkpoint every 2 iterations (model_0000001/3/5 + final)."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.tiny = tiny_demo_opts(
            os.path.join(cls.tmp, "data"), num_train=16, num_val=6, iters=6, warmup=2, steps="(5,)"
        ) + ["SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.BASE_LR", "0.001"]
        cls.out = os.path.join(cls.tmp, "run")
        args = default_argument_parser().parse_args(
            ["--config-file", CONFIG, "OUTPUT_DIR", cls.out, *cls.tiny]
        )
        train_net.main(args)
        cls.run_detections = cls._read(os.path.join(cls.out, "inference"))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    @staticmethod
    def _read(folder):
        path = os.path.join(folder, "kd_demo_val", "coco_instances_results.json")
        with open(path) as f:
            return f.read()

    def _copy_run(self):
        """A copy of the trained run folder (tests that change files work on their own)."""
        out = tempfile.mkdtemp(dir=self.tmp)
        for name in os.listdir(self.out):
            if name.endswith(".pth") or name in ("config.yaml", "last_checkpoint"):
                shutil.copy2(os.path.join(self.out, name), out)
        return out

    def _cfg(self, out, *opts):
        return load_config(os.path.join(out, "config.yaml"), list(opts))

    def _eval_only(self, weights):
        out = tempfile.mkdtemp(dir=self.tmp)
        args = default_argument_parser().parse_args(
            ["--config-file", CONFIG, "--eval-only", "OUTPUT_DIR", out, "MODEL.WEIGHTS", weights,
             *self.tiny]
        )  # fmt: skip
        return train_net.main(args)["bbox"]

    def test_lists_periodic_checkpoints_final_only_when_no_periodic_one(self):
        self.assertEqual(
            list_checkpoints(self.out, 6),
            [(2, "model_0000001.pth"), (4, "model_0000003.pth"), (6, "model_0000005.pth")],
        )
        out = tempfile.mkdtemp(dir=self.tmp)
        shutil.copy2(os.path.join(self.out, "model_final.pth"), out)
        self.assertEqual(list_checkpoints(out, 6), [(6, "model_final.pth")])
        self.assertEqual(list_checkpoints(out, None), [])

    def test_each_checkpoint_equals_eval_only_of_its_weights(self):
        out = self._copy_run()
        payload = evaluate_checkpoints(self._cfg(out), out)
        self.assertEqual([c["iteration"] for c in payload["checkpoints"]], [2, 4, 6])
        with open(os.path.join(self.out, "metrics_final.json")) as f:
            final = json.load(f)["results"]["kd_demo_val"]["bbox"]
        middle = self._eval_only(os.path.join(out, "model_0000001.pth"))
        for key in ("AP", "AP50", "AP75"):
            self.assertAlmostEqual(_bbox(payload, 6)[key], final[key], places=6, msg=key)
            self.assertAlmostEqual(_bbox(payload, 2)[key], middle[key], places=6, msg=key)
        # The first checkpoint is not the last one: a curve, not one value repeated.
        self.assertNotEqual(_bbox(payload, 2)["AP50"], final["AP50"])
        with open(os.path.join(out, CURVE_FILE)) as f:
            self.assertEqual(json.load(f)["checkpoints"], payload["checkpoints"])

    def test_cache_evaluates_only_new_or_changed_checkpoints_and_keeps_run_files(self):
        out = self._copy_run()
        cfg = self._cfg(out)
        with mock.patch.object(Trainer, "test", wraps=Trainer.test) as test:
            evaluate_checkpoints(cfg, out, every=2)  # iterations 6 and 2
            self.assertEqual(test.call_count, 2)
            payload = evaluate_checkpoints(cfg, out)  # only 4 is new
            self.assertEqual(test.call_count, 3)
            self.assertEqual([c["iteration"] for c in payload["checkpoints"]], [2, 4, 6])
            evaluate_checkpoints(cfg, out)
            self.assertEqual(test.call_count, 3)  # everything cached
            # A checkpoint written again (e.g. a resumed run) is evaluated again, alone.
            path = os.path.join(out, "model_0000003.pth")
            shutil.copyfile(os.path.join(out, "model_0000001.pth"), path)
            os.utime(path, ns=(1, 1))
            payload = evaluate_checkpoints(cfg, out)
            self.assertEqual(test.call_count, 4)
            self.assertEqual(_bbox(payload, 4), _bbox(payload, 2))
            # Another test-time setting evaluates every checkpoint again.
            evaluate_checkpoints(self._cfg(out, "TEST.DETECTIONS_PER_IMAGE", "5"), out)
            self.assertEqual(test.call_count, 7)
        # The trained run's own evaluation output was not touched.
        self.assertEqual(self._read(os.path.join(self.out, "inference")), self.run_detections)
        self.assertFalse(os.path.exists(os.path.join(out, "inference")))

    def test_no_checkpoint_is_a_clear_error(self):
        out = tempfile.mkdtemp(dir=self.tmp)
        shutil.copy2(os.path.join(self.out, "config.yaml"), out)
        with self.assertRaisesRegex(ValueError, "no checkpoint .*CHECKPOINT_PERIOD"):
            evaluate_checkpoints(self._cfg(out), out)
        with self.assertRaisesRegex(ValueError, "every must be >= 1"):
            evaluate_checkpoints(self._cfg(self.out), self.out, every=0)

    def test_cli_prints_the_curve_and_names_bad_input(self):
        out = self._copy_run()
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            self.assertEqual(eval_checkpoints.main([out, "--every", "3"]), 0)
        lines = [line.split() for line in stdout.getvalue().splitlines()]
        rows = [line for line in lines if line and line[0].isdigit()]
        self.assertEqual([r[0] for r in rows], ["6"])
        with open(os.path.join(self.out, "metrics_final.json")) as f:
            final = json.load(f)["results"]["kd_demo_val"]["bbox"]
        self.assertEqual(rows[0][3], f"{final['AP']:.2f}")
        stderr = io.StringIO()
        empty = tempfile.mkdtemp(dir=self.tmp)
        with contextlib.redirect_stderr(stderr):
            self.assertEqual(eval_checkpoints.main([empty]), 2)
            self.assertEqual(eval_checkpoints.main([os.path.join(empty, "nope")]), 2)
        self.assertIn("config.yaml not found", stderr.getvalue())
        self.assertIn("is not a folder", stderr.getvalue())


if __name__ == "__main__":
    unittest.main()
