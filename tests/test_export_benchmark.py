# Copyright (c) kd_detr contributors.
"""benchmarks/export_latency.py on a tiny config: one line per runtime with ratio= and the same
scores as eager."""
import contextlib
import io
import unittest

from tests.common import require_module
from tests.model_helpers import single_thread_module
from tests.test_benchmarks import load_benchmark

setUpModule, tearDownModule = single_thread_module()


class TestExportLatency(unittest.TestCase):
    def test_tiny_detr_every_runtime(self):
        require_module("onnxruntime")
        bench = load_benchmark("export_latency")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rows = bench.main(
                ["--models", "tiny_detr", "--size", "64", "--reps", "2", "--warmup", "1",
                 "--threads", "1", "--runtimes", "torchscript", "onnxruntime"]
            )  # fmt: skip
        self.assertEqual([r["runtime"] for r in rows], ["torchscript", "onnxruntime"])
        for row in rows:
            self.assertGreater(row["ratio"], 0.0)
            self.assertLess(row["max_score_diff"], 1e-4)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(all("ratio=" in line and "model=tiny_detr" in line for line in lines))


if __name__ == "__main__":
    unittest.main()
