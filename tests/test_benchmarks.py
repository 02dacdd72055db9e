# Copyright (c) kd_detr contributors.
"""benchmarks/params_flops.py and benchmarks/latency_vs_hf.py on tiny configs.

FLOPs follow fvcore's definition (one multiply-add per FLOP): a Linear layer applied to N vectors
costs N * in * out. The attention handle must agree with fvcore's count of the same attention
written with explicit matmuls.
"""
import importlib.util
import io
import os
import re
import unittest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import build_model

from kd_detr.modeling.meta_arch import DETR  # noqa: F401  (registers DETR)
from kd_detr.modeling.transformer import MultiheadAttention

from .common import REPO_ROOT, require_module

TINY_DETR = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")


def load_benchmark(name):
    """Import benchmarks/<name>.py (benchmarks/ is not a package)."""
    path = os.path.join(REPO_ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kd_detr_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Sampler(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x, grid):
        return F.grid_sample(x, grid, mode=self.mode, align_corners=False)


class _Attention(nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.attn = MultiheadAttention(32, 4)
        self.need_weights = need_weights

    def forward(self, q, kv):
        out = self.attn(q, kv, kv, need_weights=self.need_weights)
        return out[0] if self.need_weights else out


class TestParamsFlops(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_module("fvcore")
        torch.set_num_threads(1)
        cls.bench = load_benchmark("params_flops")

    def count(self, module, *inputs):
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module.eval(), inputs)
        analysis.set_op_handle(
            "aten::scaled_dot_product_attention", self.bench.sdpa_flop_jit,
            "aten::grid_sampler", self.bench.grid_sampler_flop_jit,
        )  # fmt: skip
        analysis.unsupported_ops_warnings(False).tracer_warnings("none")
        return analysis

    def test_tiny_detr_params_and_head_flops(self):
        cfg = self.bench.build_cfg("DETR", "R18", config_file=TINY_DETR)
        result = self.bench.measure(cfg, 64, 96)
        model = build_model(cfg)
        self.assertEqual(result["params"], sum(p.numel() for p in model.parameters()))
        backbone_params = sum(p.numel() for p in model.backbone.parameters())
        self.assertEqual(result["backbone_params"], backbone_params)
        self.assertEqual(result["unsupported"], {})

        by_module = self.bench.flop_counter(model, 64, 96).by_module()
        layers, queries, d, logits = 3, 10, 64, 5 + 1  # decoder layers, queries, width, C + 1
        # The heads run on every decoder layer's (1, Q, d) output: N = L * Q vectors.
        self.assertEqual(by_module["model.class_embed"], layers * queries * d * logits)
        box_mlp = d * d + d * d + d * 4
        self.assertEqual(by_module["model.bbox_embed"], layers * queries * box_mlp)
        # Encoder self-attention on the 2 x 3 stride-32 map (S = 6 tokens): four d x d
        # projections plus S * S * (d + d) for q @ k^T and weights @ v over all heads.
        tokens = 2 * 3
        self_attn = by_module["model.transformer.encoder.layers.0.self_attn"]
        self.assertEqual(self_attn, 4 * tokens * d * d + tokens * tokens * 2 * d)
        self.assertEqual(result["flops"], by_module[""])

    def test_sdpa_handle_matches_fvcore_matmul_count(self):
        q, kv = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
        analysis = self.count(_Attention(need_weights=False), q, kv)
        sdpa = analysis.total()
        self.assertNotIn("aten::scaled_dot_product_attention", analysis.unsupported_ops())
        self.assertEqual(sdpa, self.count(_Attention(need_weights=True), q, kv).total())
        self.assertEqual(sdpa, 2 * 7 * 32 * 32 * 2 + 2 * 11 * 32 * 32 * 2 + 2 * 7 * 11 * 2 * 32)

    def test_grid_sampler_handle(self):
        x, grid = torch.randn(2, 3, 5, 6), torch.rand(2, 4, 7, 2) * 2 - 1
        output_values = 2 * 3 * 4 * 7
        self.assertEqual(self.count(_Sampler("bilinear"), x, grid).total(), 4 * output_values)
        self.assertEqual(self.count(_Sampler("nearest"), x, grid).total(), output_values)

    def test_rt_detr_variants_take_every_backbone(self):
        from detectron2.modeling import build_backbone

        for variant in ("RT-DETR", "RT-DETRv2"):
            for backbone in ("R18", "EfficientNet-Lite0"):
                with self.subTest(variant=variant, backbone=backbone):
                    cfg = self.bench.build_cfg(variant, backbone)
                    self.assertEqual(cfg.MODEL.META_ARCHITECTURE, "RTDETR")
                    shapes = build_backbone(cfg).output_shape()
                    self.assertEqual(sorted(shapes), sorted(cfg.MODEL.RTDETR.IN_FEATURES))

    def test_dfine_variants_keep_their_backbone(self):
        cfg = self.bench.build_cfg("D-FINE-N", self.bench.FIXED_BACKBONES["D-FINE-N"])
        self.assertEqual(cfg.MODEL.META_ARCHITECTURE, "DFINE")
        self.assertEqual(list(cfg.MODEL.HGNETV2.OUT_FEATURES), ["stage3", "stage4"])
        result = self.bench.measure(cfg, 320, 320)  # >= 300 tokens for query selection
        self.assertAlmostEqual(result["params"] / 1e6, 3.78, delta=0.01)  # paper: 4M
        self.assertGreater(result["flops"], result["backbone_flops"])
        self.assertGreater(result["backbone_flops"], 0)

    def test_markdown_table_and_bad_size(self):
        row = dict(variant="DETR", backbone="R18", params=28.8e6, backbone_params=11.2e6)
        row.update(flops=4.71e9, backbone_flops=3.0e9)
        table = self.bench.markdown_table([row], 800, 1333).splitlines()
        self.assertEqual(table[2], "| DETR | R18 | 28.80 | 11.20 | 4.7 | 3.0 |")
        self.assertEqual(self.bench.parse_size("800x1333"), (800, 1333))
        with self.assertRaisesRegex(Exception, "HEIGHTxWIDTH"):
            self.bench.parse_size("800")


class TestLatencyVsHF(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        for name in ("transformers", "timm", "safetensors"):
            require_module(name)
        torch.set_num_threads(1)
        cls.bench = load_benchmark("latency_vs_hf")

    def test_tiny_detr_comparison_prints_ratio(self):
        with self.bench.quiet_hf():
            ours, hf = self.bench.build_pair("detr", preset="tiny")
        out = io.StringIO()
        result = self.bench.compare("detr", ours, hf, size=64, reps=1, warmup=0, out=out)
        line = out.getvalue().strip()
        match = re.match(r"model=detr ours_ms=(\S+) hf_ms=(\S+) ratio=(\S+) max_abs_diff=", line)
        self.assertIsNotNone(match, line)
        ours_ms, hf_ms, ratio = (float(v) for v in match.groups())
        self.assertGreater(ours_ms, 0)
        # the printed times are rounded to 0.1 ms: allow that rounding's effect on the ratio
        rounding = ratio * (0.05 / ours_ms + 0.05 / hf_ms)
        self.assertAlmostEqual(ratio, ours_ms / hf_ms, delta=0.002 + 1e-3 * ratio + rounding)
        self.assertLessEqual(result["max_abs_diff"], 1e-4)  # same weights: same outputs
        with self.assertRaisesRegex(ValueError, "reps >= 1"):
            self.bench.compare("detr", ours, hf, size=64, reps=0)

    def test_tiny_rt_detr_comparisons(self):
        for name in ("rt_detr", "rt_detr_v2", "d_fine"):
            with self.subTest(model=name), self.bench.quiet_hf():
                ours, hf = self.bench.build_pair(name, preset="tiny")
                out = io.StringIO()
                result = self.bench.compare(name, ours, hf, size=96, reps=1, warmup=0, out=out)
                self.assertIn(f"model={name} ", out.getvalue())
                self.assertLessEqual(result["max_abs_diff"], 1e-4)

    def test_interleaving_rotates_the_order(self):
        calls = []
        fns = {"ours": lambda: calls.append("ours"), "hf": lambda: calls.append("hf")}
        times = self.bench.interleaved_times(fns, reps=2, warmup=1)
        self.assertEqual(calls, ["ours", "hf", "hf", "ours", "ours", "hf"])
        self.assertEqual({k: len(v) for k, v in times.items()}, {"ours": 2, "hf": 2})


if __name__ == "__main__":
    unittest.main()


class TestKDZooOverhead(unittest.TestCase):
    def test_every_method_has_its_recipe(self):
        bench = load_benchmark("kd_zoo_overhead")
        from kd_detr.distill import KD_LOSS_REGISTRY

        for method, recipe in bench.METHODS.items():
            self.assertTrue(os.path.isfile(os.path.join(REPO_ROOT, recipe)), (method, recipe))
        # every zoo term of the registry is measured (KD-DETR's own terms through kd_detr)
        measured = {m.lower() for m in bench.METHODS}
        for term, cls in KD_LOSS_REGISTRY:
            if not cls.__module__.startswith("kd_detr."):
                continue  # a term registered by a test
            name = term[: -len("Loss")].lower()
            if name in ("kddetr", "distributionkd", "maskedfeaturekd"):
                continue  # KD-DETR itself; D-FINE's and Incremental-DETR's terms need their models
            self.assertIn(name, measured, term)

    @pytest.mark.slow
    def test_ratios_of_one_method_in_separate_processes(self):
        import json
        import tempfile

        bench = load_benchmark("kd_zoo_overhead")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "zoo.json")
            out = bench.main(["--methods", "dkd", "--size", "64", "--steps", "1", "--warmup",
                              "0", "--threads", "1", "--json", path])  # fmt: skip
            with open(path) as f:
                saved = json.load(f)
        row = out["methods"]["dkd"]
        student = out["student"]["median_s"]
        self.assertAlmostEqual(row["time_ratio"], row["kd"]["median_s"] / student)
        self.assertGreater(row["time_ratio"], 1.0)  # a KD step also runs the teacher
        self.assertEqual(saved["methods"]["dkd"]["recipe"], bench.METHODS["dkd"])
