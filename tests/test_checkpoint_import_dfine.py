# Copyright (c) kd_detr contributors.
"""Peterande/D-FINE (``--source d_fine``) checkpoint import: a synthetic state dict built from the
key/shape fixture (read from the reference code) converts and loads strictly into the tiny
D-FINE; spot checks of the HGNetv2 renaming, the RepNCSPELAN4 blocks, the split self-attention and
the D-FINE decoder parts; the EMA weights are preferred; clear errors."""
import os
import unittest

import torch

from detectron2.modeling import build_model

from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, check_state_dict_keys

from .common import REPO_ROOT
from .fixtures.dfine_official_keys import official_dfine_keys
from .model_helpers import config_from

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dfine_tiny_parity.yaml")
convert = CHECKPOINT_CONVERTERS["d_fine"]


def make_cfg(*opts):
    return config_from(CONFIG, *opts, freeze=True)


def synthetic_official(seed=0, **kwargs):
    """Random tensors with the fixture's shapes; the twice-registered ``up`` / ``reg_scale``
    are equal copies, as in a real state dict."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_dfine_keys(**kwargs).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("num_points_scale"):
            state[key] = torch.full(shape, 0.5)
        else:
            state[key] = torch.randn(shape, generator=gen)
    for name in ("up", "reg_scale"):
        state[f"decoder.{name}"] = state[f"decoder.decoder.{name}"].clone()
    return state


class TestOfficialDFINE(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.src = synthetic_official()
        cls.cfg = make_cfg()
        cls.model = build_model(cls.cfg)

    def test_converts_and_loads_strictly(self):
        src = self.src
        state = convert({"ema": {"module": src, "updates": 2}, "model": {}}, self.cfg)
        check_state_dict_keys(state, self.model.state_dict())
        self.model.load_state_dict(state, strict=True)
        same = {
            "backbone.embedder.stem2a.convolution.weight": "backbone.stem.stem2a.conv.weight",
            "backbone.embedder.stem1.lab.scale": "backbone.stem.stem1.lab.scale",
            "backbone.encoder.stages.2.downsample.normalization.running_var":
                "backbone.stages.2.downsample.bn.running_var",
            "backbone.encoder.stages.2.blocks.1.layers.2.conv2.convolution.weight":
                "backbone.stages.2.blocks.1.layers.2.conv2.conv.weight",
            "backbone.encoder.stages.3.blocks.0.aggregation.1.normalization.bias":
                "backbone.stages.3.blocks.0.aggregation.1.bn.bias",
            "input_proj.2.0.weight": "encoder.input_proj.2.conv.weight",
            "encoder.fpn_blocks.0.conv1.conv.weight": "encoder.fpn_blocks.0.cv1.conv.weight",
            "encoder.fpn_blocks.1.csp_rep1.conv2.conv.weight":
                "encoder.fpn_blocks.1.cv2.0.conv2.conv.weight",
            "encoder.pan_blocks.0.conv2.conv.weight": "encoder.pan_blocks.0.cv2.1.conv.weight",
            "encoder.pan_blocks.1.csp_rep2.bottlenecks.0.conv1.norm.weight":
                "encoder.pan_blocks.1.cv3.0.bottlenecks.0.conv1.norm.weight",
            "encoder.pan_blocks.1.conv3.norm.bias": "encoder.pan_blocks.1.cv3.1.norm.bias",
            "encoder.pan_blocks.0.conv4.conv.weight": "encoder.pan_blocks.0.cv4.conv.weight",
            "encoder.downsample_convs.1.conv2.conv.weight":
                "encoder.downsample_convs.1.0.cv2.conv.weight",
            "transformer.layers.1.gateway.gate.weight":
                "decoder.decoder.layers.1.gateway.gate.weight",
            "transformer.layers.0.ffn.linear2.bias": "decoder.decoder.layers.0.linear2.bias",
            "transformer.lqe_layers.1.reg_conf.layers.0.weight":
                "decoder.decoder.lqe_layers.1.reg_conf.layers.0.weight",
            "transformer.pre_bbox_head.layers.2.weight": "decoder.pre_bbox_head.layers.2.weight",
            "transformer.up": "decoder.decoder.up",
            "transformer.reg_scale": "decoder.reg_scale",
            "bbox_embed.1.layers.2.weight": "decoder.dec_bbox_head.1.layers.2.weight",
            "class_embed.0.bias": "decoder.dec_score_head.0.bias",
            "denoising.label_enc.weight": "decoder.denoising_class_embed.weight",
            "enc_output.1.weight": "decoder.enc_output.norm.weight",
        }  # fmt: skip
        for ours, theirs in same.items():
            self.assertTrue(torch.equal(state[ours], src[theirs]), ours)
        packed = src["decoder.decoder.layers.0.self_attn.in_proj_weight"]
        for i, name in enumerate("qkv"):
            ours = state[f"transformer.layers.0.self_attn.{name}_proj.weight"]
            self.assertTrue(torch.equal(ours, packed[i * 64 : (i + 1) * 64]), name)
        self.assertFalse([k for k in state if "points_scale" in k])

    def test_model_weights_without_ema(self):
        state = convert({"model": self.src}, self.cfg)
        self.model.load_state_dict(state, strict=True)

    def test_clear_errors(self):
        bad = dict(self.src, **{"decoder.foo.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ValueError, r"unknown key.*decoder\.foo\.weight"):
            convert(bad, self.cfg)
        untied = dict(self.src, **{"decoder.up": self.src["decoder.up"] + 1})
        with self.assertRaisesRegex(ValueError, r"decoder\.up \(expected equal"):
            convert(untied, self.cfg)
        missing = {k: v for k, v in self.src.items() if "lqe_layers.1." not in k}
        with self.assertRaisesRegex(ValueError, r"missing.*lqe_layers\.1\.reg_conf"):
            check_state_dict_keys(convert(missing, self.cfg), self.model.state_dict())
        wide = synthetic_official(reg_max=16)
        with self.assertRaisesRegex(ValueError, r"shape.*bbox_embed\.0\.layers\.2\.weight"):
            check_state_dict_keys(convert(wide, self.cfg), self.model.state_dict())
        with self.assertRaisesRegex(ValueError, r"class_embed\.0\.bias has 80 rows.*NUM_CLASSES=5"):
            convert(synthetic_official(classes=80), self.cfg)
        with self.assertRaisesRegex(ValueError, "needs a DFINE config"):
            convert(self.src, config_from(os.path.join(REPO_ROOT, "configs/tests/dino_tiny.yaml")))
        with self.assertRaisesRegex(ValueError, "not a Peterande/D-FINE"):
            convert({k: v for k, v in self.src.items() if "pre_bbox" not in k}, self.cfg)


if __name__ == "__main__":
    unittest.main()
