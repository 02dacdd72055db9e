# Copyright (c) kd_detr contributors.
"""train_net.py end to end on a tiny demo split: train, metrics files, eval-only, errors."""
import glob
import json
import os
import tempfile
import unittest

from detectron2.engine import default_argument_parser

import train_net
from tests.common import REPO_ROOT, tiny_demo_opts

DEMO_CONFIGS = os.path.join(REPO_ROOT, "configs", "demo")


class _TrainNetCase:
    """Train a few iterations with ``config``, then check outputs, eval-only and errors."""

    config = None
    num_classes_key = None

    @classmethod
    def _args(cls, *extra):
        config = os.path.join(DEMO_CONFIGS, cls.config)
        return default_argument_parser().parse_args(["--config-file", config, *extra])

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.tiny = tiny_demo_opts(
            os.path.join(cls.tmp, "data"), num_train=16, num_val=6, iters=4, warmup=2, steps="(3,)"
        )
        cls.out = os.path.join(cls.tmp, "train")
        cls.train_results = train_net.main(cls._args("OUTPUT_DIR", cls.out, *cls.tiny))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_train_writes_metrics_json_tensorboard_and_checkpoint(self):
        with open(os.path.join(self.out, "metrics_final.json")) as f:
            # Strict JSON: an undefined metric is null, never a bare NaN.
            final = json.loads(f.read(), parse_constant=lambda c: self.fail(f"not JSON: {c}"))
        self.assertEqual(final["mode"], "train")
        self.assertEqual(final["max_iter"], 4)
        # Batch, lr, max_iter and steps as configured and as run (same here: 1 process).
        self.assertEqual(final["solver"]["configured"], final["solver"]["as_run"])
        self.assertEqual(final["solver"]["as_run"]["MAX_ITER"], 4)
        self.assertEqual(final["solver"]["as_run"]["STEPS"], [3])
        bbox = final["results"]["kd_demo_val"]["bbox"]
        for key in ("AP", "AP50", "AP75", "AP-circle", "AP-cross"):
            self.assertIn(key, bbox)
        # Detectron2's JSON writer: one line per logged iteration, with losses.
        with open(os.path.join(self.out, "metrics.json")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        self.assertTrue(any("total_loss" in line for line in lines))
        self.assertTrue(glob.glob(os.path.join(self.out, "events.out.tfevents.*")))
        self.assertTrue(os.path.isfile(os.path.join(self.out, "model_final.pth")))

    def test_eval_only_reproduces_training_eval(self):
        out = os.path.join(self.tmp, "eval")
        weights = os.path.join(self.out, "model_final.pth")
        results = train_net.main(
            self._args("--eval-only", "OUTPUT_DIR", out, "MODEL.WEIGHTS", weights, *self.tiny)
        )
        trained = self.train_results or json.load(
            open(os.path.join(self.out, "metrics_final.json"))
        )["results"]["kd_demo_val"]
        for key, value in trained["bbox"].items():
            if value is not None and value == value:  # NaN / null: classes absent from the split
                self.assertAlmostEqual(results["bbox"][key], value, places=6, msg=key)
        with open(os.path.join(out, "metrics_final.json")) as f:
            self.assertEqual(json.load(f)["mode"], "eval_only")
        # The very same detections: the checkpoint (not the seeded initialisation) was evaluated.
        results_file = os.path.join("inference", "kd_demo_val", "coco_instances_results.json")
        detections = [json.load(open(os.path.join(d, results_file))) for d in (self.out, out)]
        self.assertGreater(len(detections[0]), 0)
        self.assertEqual(detections[0], detections[1])

    def test_class_count_mismatch_is_a_clear_error(self):
        out = os.path.join(self.tmp, "bad")
        args = self._args("OUTPUT_DIR", out, self.num_classes_key, "3")
        with self.assertRaises(ValueError) as ctx:
            train_net.setup(args)
        message = str(ctx.exception)
        self.assertIn(f"{self.num_classes_key} is 3", message)
        self.assertIn("'kd_demo_train' has 4 classes", message)


class TestTrainNetFasterRCNN(_TrainNetCase, unittest.TestCase):
    config = "faster_rcnn_efflite0_fpn_demo.yaml"
    num_classes_key = "MODEL.ROI_HEADS.NUM_CLASSES"


class TestTrainNetDABDETR(_TrainNetCase, unittest.TestCase):
    config = "dab_detr_efflite0_demo.yaml"
    num_classes_key = "MODEL.DETR.NUM_CLASSES"


if __name__ == "__main__":
    unittest.main()
