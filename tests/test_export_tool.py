# Copyright (c) kd_detr contributors.
"""tools/export_model.py end to end: export, --check against eager on real images, --run-eval on
coco128 val (exported AP = eager AP) with a random tiny DETR checkpoint, one-line errors.

(The demo student's numbers, trained, are in docs/BENCHMARKS.md; an untrained demo student
gives every query the same score, so its detections' order would be arbitrary.)"""
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import unittest

from detectron2.checkpoint import DetectionCheckpointer

from tests.common import REPO_ROOT, require_module, shared_data
from tests.export_helpers import tiny_model
from tests.model_helpers import single_thread_module

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import export_model as tool  # noqa: E402  (tools/ is not a package)

setUpModule, tearDownModule = single_thread_module()

DETR_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")
DAB_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
DEFORMABLE_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")


def run_tool(*argv):
    """(exit code, stdout, stderr) of ``export_model.main(argv)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class TestExportTool(unittest.TestCase):
    def setUp(self):
        require_module("onnxruntime")
        self.tmp = tempfile.mkdtemp(prefix="kd_export_tool_")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def coco128_opts(self):
        root = shared_data("coco128")
        json_file = os.path.join(root, "annotations", "instances_val2017.json")
        return [
            "DATASETS.COCO_JSON", f"['kd_export_coco128_val,{json_file},{root}/val2017']",
            "DATASETS.TEST", "('kd_export_coco128_val',)", "MODEL.DETR.NUM_CLASSES", "80",
            "DATALOADER.NUM_WORKERS", "0",
        ]  # fmt: skip

    def test_export_check_and_eval_on_coco128(self):
        cfg, model = tiny_model("detr_tiny_parity.yaml", *self.coco128_opts())
        checkpointer = DetectionCheckpointer(model, save_dir=self.tmp)
        checkpointer.save("random_detr")
        out_dir = os.path.join(self.tmp, "onnx")
        code, out, err = run_tool(
            "--config-file", DETR_CONFIG, "--weights", os.path.join(self.tmp, "random_detr.pth"),
            "--format", "onnx", "--output", out_dir, "--dynamic-batch", "--image-size", "96", "128",
            "--check", "--run-eval", *self.coco128_opts(),
        )  # fmt: skip
        self.assertEqual(code, 0, out + err)
        self.assertTrue(os.path.exists(os.path.join(out_dir, "model.onnx")))
        self.assertTrue(os.path.exists(os.path.join(out_dir, "export.json")))
        checks = [line for line in out.splitlines() if line.startswith("check ")]
        self.assertEqual(len(checks), 2, out)  # batch 1 and 3
        self.assertTrue(all(line.endswith("OK") for line in checks), out)
        evals = [line for line in out.splitlines() if line.startswith("eval kd_export_coco128")]
        self.assertEqual(len(evals), 1, out)
        eager = float(evals[0].split("eager AP ")[1].split()[0])
        exported = float(evals[0].split(" AP ")[2].split()[0])
        self.assertLessEqual(abs(eager - exported), 0.1, evals[0])

    def test_open_vocabulary_head_with_the_vocabulary_given_at_export(self):
        """Real CLIP text embeddings of the 80 COCO classes (Detic's file, no sidecar: rows are
        the COCO classes); the exported graph and export.json carry that vocabulary."""
        text = os.path.join(shared_data("clip_text"), "coco_clip_a+cname.npy")
        opts = [
            "MODEL.DETR.NUM_CLASSES", "80", "MODEL.DETR.CLASS_HEAD", "region_text",
            "MODEL.OV.DETR_HEAD.VOCABULARY_FROM_DATASETS", "False", "MODEL.OV.EMBED_DIM", "512",
            "MODEL.OV.TEXT_EMBEDDINGS", text, "MODEL.OV.BACKGROUND", "none",
            "MODEL.OV.TEMPERATURE", "0.02",
        ]  # fmt: skip
        cfg, model = tiny_model("dab_detr_tiny_parity.yaml", *opts)
        DetectionCheckpointer(model, save_dir=self.tmp).save("ov_dab")
        code, out, err = run_tool(
            "--config-file", DAB_CONFIG,
            "--weights", os.path.join(self.tmp, "ov_dab.pth"), "--format", "onnx",
            "--output", self.tmp, "--dynamic-batch", "--image-size", "96", "128",
            "--check-images", os.path.join(shared_data("coco128", "val2017"), "*.jpg"),
            "--text-embeddings", text, "--check", *opts,
        )  # fmt: skip
        self.assertEqual(code, 0, out + err)
        self.assertEqual(sum(line.endswith("OK") for line in out.splitlines()), 2, out)
        with open(os.path.join(self.tmp, "export.json")) as f:
            names = json.load(f)["class_names"]
        self.assertEqual((len(names), names[0]), (80, "person"))

    def test_opset_too_low_is_one_line_naming_the_fix(self):
        code, out, err = run_tool(
            "--config-file", DEFORMABLE_CONFIG, "--format", "onnx", "--output", self.tmp,
            "--opset", "13", "--image-size", "64", "64",
        )  # fmt: skip
        self.assertEqual(code, 2)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertEqual(len(lines), 1, err)
        self.assertIn("Fix: --opset 16", lines[0])


if __name__ == "__main__":
    unittest.main()
