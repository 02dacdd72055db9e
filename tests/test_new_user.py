# Copyright (c) kd_detr contributors.
"""A new user's path (issue 18): one-line start-up errors (no GPU, batch size against
SOLVER.REFERENCE_WORLD_SIZE, config key typos with the nearest keys), MODEL.DEVICE auto, kd_detr's
warnings in OUTPUT_DIR/log.txt, strict-JSON metrics, no FutureWarning at import."""
import io
import json
import math
import os
import re
import subprocess
import sys
import unittest
import warnings
from contextlib import redirect_stdout
from unittest import mock

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

import train_net
from kd_detr.config import UnknownConfigKeyError, load_config
from kd_detr.engine import write_metrics_json
from kd_detr.engine.setup import StartupError, check_schedule, solver_as_run
from tests.common import REPO_ROOT, TempDatasetsCase, tiny_demo_opts

COCO_RECIPE = os.path.join(REPO_ROOT, "configs", "dab_detr", "dab_detr_R_18_50ep_coco.yaml")
DEMO = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite0_demo.yaml")
NO_GPU = mock.patch("torch.cuda.is_available", return_value=False)
# Detectron2's file format: "[12/06 04:31:07] logger.name LEVEL: message".
LOG_LINE = r"^\[\d\d/\d\d \d\d:\d\d:\d\d\] {logger} {level}: .*{text}"


def _args(config, *opts, eval_only=False):
    flags = ["--config-file", config] + (["--eval-only"] if eval_only else [])
    return default_argument_parser().parse_args(flags + list(opts))


def _strict_json(text):
    """json.loads that rejects NaN / Infinity (what most parsers other than Python's do)."""

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


class TestStartupErrors(TempDatasetsCase):
    def test_batch_not_multiple_of_reference_world_size_names_both_and_the_fix(self):
        args = _args(COCO_RECIPE, "SOLVER.IMS_PER_BATCH", "2", "MODEL.DEVICE", "cpu")
        with self.assertRaises(StartupError) as ctx:
            train_net.setup(args)
        message = str(ctx.exception)
        self.assertNotIn("\n", message)
        self.assertIn("SOLVER.IMS_PER_BATCH 2", message)
        self.assertIn("SOLVER.REFERENCE_WORLD_SIZE 8", message)
        self.assertIn("`SOLVER.REFERENCE_WORLD_SIZE 0`", message)
        # The fix works: the same command with it sets up (eval-only never rescales: no check).
        out = os.path.join(self.tmp, "ok")
        fixed = _args(COCO_RECIPE, "SOLVER.IMS_PER_BATCH", "2", "MODEL.DEVICE", "cpu",
                      "SOLVER.REFERENCE_WORLD_SIZE", "0", "OUTPUT_DIR", out)  # fmt: skip
        cfg = train_net.setup(fixed)
        self.assertEqual(cfg.SOLVER.IMS_PER_BATCH, 2)
        train_net.setup(_args(COCO_RECIPE, "SOLVER.IMS_PER_BATCH", "2", "MODEL.DEVICE", "cpu",
                              "OUTPUT_DIR", out, eval_only=True))  # fmt: skip

    def test_cuda_without_gpu_says_add_model_device_cpu(self):
        with NO_GPU, self.assertRaises(StartupError) as ctx:
            train_net.setup(_args(COCO_RECIPE, eval_only=True))
        message = str(ctx.exception)
        self.assertNotIn("\n", message)
        self.assertIn("MODEL.DEVICE is 'cuda'", message)
        self.assertIn("`MODEL.DEVICE cpu`", message)

    def test_model_device_auto_resolves_in_load_config(self):
        with NO_GPU, self.assertLogs("kd_detr.config", "WARNING") as logs:
            cfg = load_config(COCO_RECIPE, ["MODEL.DEVICE", "auto"])
        self.assertEqual(cfg.MODEL.DEVICE, "cpu")
        self.assertIn("no CUDA GPU", logs.output[0])
        with mock.patch("torch.cuda.is_available", return_value=True):
            self.assertEqual(load_config(COCO_RECIPE, ["MODEL.DEVICE", "auto"]).MODEL.DEVICE,
                             "cuda")  # fmt: skip

    @unittest.skipIf(torch.cuda.is_available(), "needs a machine without a GPU")
    def test_command_prints_one_line_without_traceback(self):
        proc = subprocess.run(
            [sys.executable, "train_net.py", "--config-file", COCO_RECIPE, "--eval-only"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        self.assertEqual(proc.returncode, 1)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertNotIn("FutureWarning", proc.stderr)  # silenced at kd_detr's import
        self.assertEqual(proc.stderr.strip().count("\n"), 0, proc.stderr)
        self.assertIn("train_net.py: error: MODEL.DEVICE is 'cuda'", proc.stderr)

    def test_multi_process_command_stops_with_one_line_before_launching(self):
        proc = subprocess.run(
            [sys.executable, "train_net.py", "--config-file", DEMO, "--num-gpus", "2",
             "SOLVER.IMS_PER_BATCH", "6", "SOLVER.REFERENCE_WORLD_SIZE", "4"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr.strip().count("\n"), 0, proc.stderr)
        self.assertIn("train_net.py: error: SOLVER.IMS_PER_BATCH 6 is not a multiple of "
                      "SOLVER.REFERENCE_WORLD_SIZE 4", proc.stderr)  # fmt: skip

    def test_a_step_equal_to_the_rescaled_max_iter_is_named(self):
        # MAX_ITER 5 and STEPS (4,) on 2 processes with REFERENCE_WORLD_SIZE 1: both become 2.
        cfg = load_config(DEMO, ["SOLVER.MAX_ITER", "5", "SOLVER.STEPS", "(4,)",
                                 "SOLVER.REFERENCE_WORLD_SIZE", "1"], register_datasets=False)
        with self.assertRaises(StartupError) as ctx:
            check_schedule(cfg, 2)
        self.assertIn("SOLVER.MAX_ITER 5 and step 4 both become 2 on 2 process(es)",
                      str(ctx.exception))  # fmt: skip
        check_schedule(cfg, 1)  # one process: 4 < 5, fine


class TestConfigKeySuggestions(TempDatasetsCase):
    def test_command_line_typo_lists_the_nearest_keys(self):
        with self.assertRaises(UnknownConfigKeyError) as ctx:
            load_config(COCO_RECIPE, ["MODEL.KD.TEMPERATUR", "2"])
        message = str(ctx.exception)
        self.assertIn("Non-existent config key: MODEL.KD.TEMPERATUR", message)
        self.assertIn("did you mean MODEL.KD.TEMPERATURE", message)
        self.assertIsInstance(ctx.exception, KeyError)  # callers catching yacs' KeyError still do

    def test_file_typo_lists_the_nearest_keys(self):
        bad = os.path.join(self.tmp, "bad.yaml")
        with open(bad, "w") as f:
            f.write(f'_BASE_: "{COCO_RECIPE}"\nMODEL:\n  DETR:\n    NUM_QUERY: 100\n')
        with self.assertRaises(UnknownConfigKeyError) as ctx:
            load_config(bad)
        self.assertIn("MODEL.DETR.NUM_QUERIES", ctx.exception.suggestions)
        self.assertIn(bad, str(ctx.exception))

    def test_short_last_part_is_matched_within_its_namespace(self):
        with self.assertRaises(UnknownConfigKeyError) as ctx:
            load_config("", ["MODEL.KD.TEMP", "2"])
        self.assertIn("MODEL.KD.TEMPERATURE", ctx.exception.suggestions)


class TestLogTxt(TempDatasetsCase):
    def _coco_json_with_a_degenerate_box(self):
        json_file = os.path.join(self.tmp, "instances.json")
        content = {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                 "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [8, 8, 0, 10], "area": 0,
                 "iscrowd": 0},
            ],  # fmt: skip
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate("abcd")],
        }
        with open(json_file, "w") as f:
            json.dump(content, f)
        return json_file

    def test_kd_detr_warnings_land_in_log_txt_with_timestamps(self):
        json_file = self._coco_json_with_a_degenerate_box()
        out = os.path.join(self.tmp, "out")
        self.names.append("t_new_user")
        args = _args(
            DEMO, "MODEL.DEVICE", "auto", "OUTPUT_DIR", out,
            "DATASETS.COCO_JSON", f'["t_new_user,{json_file},{self.tmp}"]',
            "DATASETS.TRAIN", "('t_new_user',)", "DATASETS.TEST", "()",
        )  # fmt: skip
        with NO_GPU, redirect_stdout(io.StringIO()):
            train_net.setup(args)  # "auto" fell back to the CPU while the config was loaded
            DatasetCatalog.get("t_new_user")  # dropped 1 annotation, after set-up
        with open(os.path.join(out, "log.txt")) as f:
            log = f.read()
        for logger, text in (
            (r"kd_detr\.config", "MODEL.DEVICE auto: no CUDA GPU"),
            (r"kd_detr\.data\.datasets\.coco_json", "dropped 1 annotation"),
        ):
            pattern = LOG_LINE.format(logger=logger, level="WARNING", text=re.escape(text))
            self.assertRegex(log, re.compile(pattern, re.M))


class TestReadmeOwnData(TempDatasetsCase):
    def test_the_readme_yaml_sets_up_a_run_on_a_coco_json(self):
        with open(os.path.join(REPO_ROOT, "README.md")) as f:
            section = f.read().split("## Your own data", 1)[1]
        text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
        for split in ("train", "val"):
            json_file = os.path.join(self.tmp, f"{split}.json")
            with open(json_file, "w") as f:
                json.dump({"images": [], "annotations": [], "categories": [
                    {"id": i, "name": n} for i, n in enumerate(("RBC", "WBC", "Platelets"), 1)
                ]}, f)  # fmt: skip
            text = text.replace(f"path/{split}.json", json_file)
            text = text.replace(f"path/{split}_images", self.tmp)
        # _BASE_ is relative to the YAML's folder: the README's file sits at the repository root.
        config = os.path.join(self.tmp, "mine.yaml")
        with open(config, "w") as f:
            f.write(text.replace('_BASE_: "configs/', f'_BASE_: "{REPO_ROOT}/configs/'))
        self.names += ["my_train", "my_val"]
        with redirect_stdout(io.StringIO()):
            cfg = train_net.setup(_args(config, "OUTPUT_DIR", os.path.join(self.tmp, "out")))
        self.assertIn(cfg.MODEL.DEVICE, ("cpu", "cuda"))
        self.assertEqual(cfg.MODEL.DETR.NUM_CLASSES, 3)
        self.assertEqual(MetadataCatalog.get("my_train").thing_classes, ["RBC", "WBC", "Platelets"])
        # A class count that does not match the json's categories stops at start-up.
        with self.assertRaises(ValueError) as ctx:
            train_net.setup(_args(config, "MODEL.DETR.NUM_CLASSES", "80"))
        message = str(ctx.exception)
        self.assertIn("MODEL.DETR.NUM_CLASSES is 80 but dataset 'my_train' has 3", message)


class TestMetricsJson(TempDatasetsCase):
    def test_nan_is_written_as_null_and_print_metrics_reads_it(self):
        cfg = load_config(DEMO, ["OUTPUT_DIR", self.tmp], register_datasets=False)
        results = {"bbox": {"AP": np.float32(12.5), "AP50": 30.0, "APl": float("nan"),
                            "AP-circle": np.float64("nan"), "count": np.int64(3)}}  # fmt: skip
        solver = {
            "configured": {"MAX_ITER": 5, "STEPS": (4,)},
            "as_run": {"MAX_ITER": 2, "STEPS": (2,)},
        }
        path = write_metrics_json(cfg, results, {"solver": solver})
        with open(path) as f:
            metrics = _strict_json(f.read())
        bbox = metrics["results"]["kd_demo_val"]["bbox"]
        self.assertEqual(bbox, {"AP": 12.5, "AP50": 30.0, "APl": None, "AP-circle": None,
                                "count": 3})  # fmt: skip
        self.assertEqual(metrics["solver"]["as_run"]["STEPS"], [2])
        printed = subprocess.run(
            [sys.executable, os.path.join(REPO_ROOT, "tools", "print_metrics.py"), path],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        self.assertIn("AP (%)", printed)
        self.assertRegex(printed, r"12\.50\s+30\.00\s+n/a")
        self.assertRegex(printed, r"SOLVER\.MAX_ITER\s+5 -> 2")

    def test_solver_as_run_records_configured_and_rescaled_values(self):
        cfg = load_config(DEMO, ["SOLVER.MAX_ITER", "5", "SOLVER.STEPS", "(2,)",
                                 "SOLVER.REFERENCE_WORLD_SIZE", "1"], register_datasets=False)
        with mock.patch("detectron2.utils.comm.get_world_size", return_value=2), self.assertLogs(
            "kd_detr.engine.setup", "INFO"
        ) as logs:
            solver = solver_as_run(cfg)
        self.assertEqual(solver["configured"]["MAX_ITER"], 5)
        self.assertEqual(solver["as_run"]["MAX_ITER"], 2)  # Detectron2: round(5 / 2)
        self.assertEqual(solver["as_run"]["IMS_PER_BATCH"], 2 * cfg.SOLVER.IMS_PER_BATCH)
        self.assertTrue(math.isclose(solver["as_run"]["BASE_LR"], 2 * cfg.SOLVER.BASE_LR))
        self.assertEqual(solver["as_run"]["STEPS"], [1])
        self.assertEqual(len(logs.output), 1)
        self.assertIn("MAX_ITER 5 -> 2", logs.output[0])
        self.assertIn("SOLVER.REFERENCE_WORLD_SIZE 0", logs.output[0])


class TestTwoProcessRun(TempDatasetsCase):
    @pytest.mark.slow
    def test_rescaled_schedule_is_what_metrics_final_records(self):
        # The example: MAX_ITER 5 on 2 processes with REFERENCE_WORLD_SIZE 1 runs 2
        # iterations of twice the batch; metrics_final.json used to record max_iter 5.
        out = os.path.join(self.tmp, "out")
        tiny = tiny_demo_opts(os.path.join(self.tmp, "data"), iters=5, steps="(2,)")
        tiny += ["SOLVER.REFERENCE_WORLD_SIZE", "1", "OUTPUT_DIR", out]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "train_net.py", "--config-file", DEMO, "--num-gpus", "2", *tiny],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env,
        )  # fmt: skip
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        with open(os.path.join(out, "metrics_final.json")) as f:
            final = _strict_json(f.read())
        self.assertEqual((final["world_size"], final["max_iter"]), (2, 2))
        solver = final["solver"]
        self.assertEqual(solver["configured"]["MAX_ITER"], 5)
        self.assertEqual(solver["as_run"]["MAX_ITER"], 2)
        self.assertEqual(solver["as_run"]["IMS_PER_BATCH"], 4)
        self.assertEqual(solver["as_run"]["STEPS"], [1])
        with open(os.path.join(out, "log.txt")) as f:
            log = f.read()
        self.assertEqual(log.count("Solver rescaled from SOLVER.REFERENCE_WORLD_SIZE 1"), 1)


class TestNoFutureWarning(unittest.TestCase):
    def test_importing_the_entry_point_prints_no_jit_warning(self):
        proc = subprocess.run(
            [sys.executable, "-W", "error::FutureWarning", "-c", "import train_net"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])

    def test_the_filter_is_narrow(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.jit.script(torch.nn.ReLU())  # anyone else's torch.jit.script still warns
        self.assertTrue(any("torch.jit.script" in str(w.message) for w in caught))


if __name__ == "__main__":
    unittest.main()
