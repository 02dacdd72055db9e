# Copyright (c) kd_detr contributors.
"""lyuwenyu/RT-DETR (``--source rt_detr``) checkpoint import: synthetic v1 / v2 state dicts built
from the key/shape fixture (read from the reference code) convert and load strictly into the
tiny RT-DETR; spot checks of renamed, split and per-layer tensors; the EMA weights are preferred
over "model"; clear errors for unknown / missing keys and size or version mismatches."""
import os
import unittest

import torch

from detectron2.modeling import build_model

from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, check_state_dict_keys

from .common import REPO_ROOT
from .fixtures.rt_detr_official_keys import official_rt_detr_keys
from .model_helpers import config_from

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "rt_detr_tiny_parity.yaml")
V2 = ["MODEL.RTDETR.VERSION", "2", "MODEL.RTDETR.DEC_N_POINTS", "[2, 2, 2]"]
convert = CHECKPOINT_CONVERTERS["rt_detr"]


def make_cfg(*opts):
    return config_from(CONFIG, *opts, freeze=True)


def synthetic_official(seed=0, **kwargs):
    """Random tensors with the fixture's shapes (counters and v2's 1 / points buffers as the
    reference model holds them)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_rt_detr_keys(**kwargs).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("num_points_scale"):
            state[key] = torch.full(shape, 0.5)
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


class TestOfficialRTDETR(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.v1 = synthetic_official(version=1)
        cls.v2 = synthetic_official(version=2, anchors=21)
        cls.cfg_v1, cls.cfg_v2 = make_cfg(), make_cfg(*V2)
        cls.model_v1, cls.model_v2 = build_model(cls.cfg_v1), build_model(cls.cfg_v2)

    def check_loads(self, source, cfg, model):
        state = convert(source, cfg)
        check_state_dict_keys(state, model.state_dict())
        model.load_state_dict(state, strict=True)
        return state

    def test_v1_converts_and_loads_strictly(self):
        src = self.v1
        state = self.check_loads({"ema": {"module": src, "updates": 3}}, self.cfg_v1, self.model_v1)
        same = {
            "backbone.stem.conv2.weight": "backbone.conv1.conv1_2.conv.weight",
            "backbone.res2.0.shortcut.weight": "backbone.res_layers.0.blocks.0.short.conv.weight",
            "backbone.res3.0.shortcut.norm.running_var":
                "backbone.res_layers.1.blocks.0.short.conv.norm.running_var",
            "backbone.res4.1.conv2.weight": "backbone.res_layers.2.blocks.1.branch2b.conv.weight",
            "input_proj.1.0.weight": "encoder.input_proj.1.0.weight",
            "input_proj.2.1.running_mean": "encoder.input_proj.2.1.running_mean",
            "encoder.aifi.0.layers.0.ffn.linear2.weight":
                "encoder.encoder.0.layers.0.linear2.weight",
            "encoder.pan_blocks.1.bottlenecks.2.conv1.conv.weight":
                "encoder.pan_blocks.1.bottlenecks.2.conv1.conv.weight",
            "decoder_input_proj.0.1.weight": "decoder.input_proj.0.norm.weight",
            "transformer.layers.1.norm3.bias": "decoder.decoder.layers.1.norm3.bias",
            "transformer.layers.0.cross_attn.sampling_offsets.weight":
                "decoder.decoder.layers.0.cross_attn.sampling_offsets.weight",
            "transformer.layers.1.ffn.linear1.weight": "decoder.decoder.layers.1.linear1.weight",
            "transformer.query_pos_head.layers.1.weight": "decoder.query_pos_head.layers.1.weight",
            "denoising.label_enc.weight": "decoder.denoising_class_embed.weight",
            "enc_output.1.weight": "decoder.enc_output.1.weight",
            "enc_score_head.bias": "decoder.enc_score_head.bias",
            "class_embed.1.weight": "decoder.dec_score_head.1.weight",
            "bbox_embed.0.layers.2.bias": "decoder.dec_bbox_head.0.layers.2.bias",
        }  # fmt: skip
        for ours, theirs in same.items():
            self.assertTrue(torch.equal(state[ours], src[theirs]), ours)
        # packed q/k/v of nn.MultiheadAttention, split in order (encoder and decoder)
        for packed, base in (
            ("encoder.encoder.0.layers.0.self_attn.in_proj", "encoder.aifi.0.layers.0.self_attn"),
            ("decoder.decoder.layers.1.self_attn.in_proj", "transformer.layers.1.self_attn"),
        ):
            for i, name in enumerate("qkv"):
                rows = slice(i * 64, (i + 1) * 64)
                w, b = src[packed + "_weight"][rows], src[packed + "_bias"][rows]
                self.assertTrue(torch.equal(state[f"{base}.{name}_proj.weight"], w), name)
                self.assertTrue(torch.equal(state[f"{base}.{name}_proj.bias"], b), name)
        # the frozen backbone keeps no counters; the encoder's BatchNorms get fresh ones
        self.assertNotIn("backbone.stem.conv1.norm.num_batches_tracked", state)
        self.assertEqual(int(state["encoder.lateral_convs.0.norm.num_batches_tracked"]), 0)

    def test_v2_converts_and_loads_strictly(self):
        src = self.v2
        state = self.check_loads({"model": src}, self.cfg_v2, self.model_v2)
        same = {
            "input_proj.0.0.weight": "encoder.input_proj.0.conv.weight",
            "input_proj.0.1.bias": "encoder.input_proj.0.norm.bias",
            "enc_output.0.weight": "decoder.enc_output.proj.weight",
            "enc_output.1.bias": "decoder.enc_output.norm.bias",
            "transformer.layers.1.cross_attn.attention_weights.bias":
                "decoder.decoder.layers.1.cross_attn.attention_weights.bias",
        }  # fmt: skip
        for ours, theirs in same.items():
            self.assertTrue(torch.equal(state[ours], src[theirs]), ours)
        # saved anchors / valid_mask and the derived num_points_scale buffers are dropped
        self.assertFalse([k for k in state if "anchors" in k or "points_scale" in k])

    def test_trainable_backbone_norm_gets_counters(self):
        cfg = make_cfg("MODEL.RESNET_VD.NORM", "BN")
        state = self.check_loads(self.v1, cfg, build_model(cfg))
        self.assertEqual(int(state["backbone.res5.1.conv1.norm.num_batches_tracked"]), 0)

    def test_ema_is_preferred_over_model(self):
        other = synthetic_official(seed=1, version=1)
        key, theirs = "class_embed.0.bias", "decoder.dec_score_head.0.bias"
        with self.assertLogs("kd_detr.checkpoint.official_rt_detr", "INFO") as logs:
            state = convert({"ema": {"module": self.v1, "updates": 9}, "model": other}, self.cfg_v1)
        self.assertTrue(torch.equal(state[key], self.v1[theirs]))
        self.assertIn("EMA", "\n".join(logs.output))
        state = convert({"model": other, "optimizer": {}}, self.cfg_v1)
        self.assertTrue(torch.equal(state[key], other[theirs]))
        state = convert({"module." + k: v for k, v in other.items()}, self.cfg_v1)  # bare, DDP
        self.assertTrue(torch.equal(state[key], other[theirs]))

    def test_denoising_off_and_learned_queries(self):
        cfg = make_cfg("MODEL.DETR.DN.ENABLED", "False")
        self.check_loads(self.v1, cfg, build_model(cfg))
        cfg = make_cfg("MODEL.RTDETR.LEARN_INITIAL_QUERY", "True")
        src = synthetic_official(version=1, learn_query=True)
        state = self.check_loads(src, cfg, build_model(cfg))
        self.assertTrue(torch.equal(state["tgt_embed.weight"], src["decoder.tgt_embed.weight"]))
        with self.assertRaisesRegex(ValueError, "LEARN_INITIAL_QUERY"):
            convert(src, self.cfg_v1)

    def test_clear_errors(self):
        bad = dict(self.v1, **{"decoder.foo.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ValueError, r"unknown key.*decoder\.foo\.weight"):
            convert(bad, self.cfg_v1)
        missing = {k: v for k, v in self.v1.items() if "dec_bbox_head.1." not in k}
        with self.assertRaisesRegex(ValueError, r"missing.*bbox_embed\.1\.layers\.0\.weight"):
            check_state_dict_keys(convert(missing, self.cfg_v1), self.model_v1.state_dict())
        wide = synthetic_official(version=1, ffn=96)
        with self.assertRaisesRegex(ValueError, r"shape.*transformer\.layers\.0\.ffn\.linear1"):
            check_state_dict_keys(convert(wide, self.cfg_v1), self.model_v1.state_dict())
        coco = synthetic_official(version=1, classes=80)
        with self.assertRaisesRegex(ValueError, r"class_embed\.0\.bias has 80 rows.*NUM_CLASSES"):
            convert(coco, self.cfg_v1)
        with self.assertRaisesRegex(ValueError, "HIDDEN_DIM"):
            convert(self.v1, make_cfg("MODEL.DETR.HIDDEN_DIM", "96"))
        with self.assertRaisesRegex(ValueError, "v1.*MODEL.RTDETR.VERSION=2"):
            convert(self.v1, self.cfg_v2)
        with self.assertRaisesRegex(ValueError, "v2.*MODEL.RTDETR.VERSION=1"):
            convert(self.v2, self.cfg_v1)
        with self.assertRaisesRegex(ValueError, "DEC_N_POINTS"):
            convert(self.v2, make_cfg(*V2[:2], "MODEL.RTDETR.DEC_N_POINTS", "[4]"))
        with self.assertRaisesRegex(ValueError, "needs an RTDETR config"):
            convert(self.v1, config_from(os.path.join(REPO_ROOT, "configs/tests/dino_tiny.yaml")))
        with self.assertRaisesRegex(ValueError, "not a lyuwenyu/RT-DETR"):
            convert({k: v for k, v in self.v1.items() if "res_layers" not in k}, self.cfg_v1)


if __name__ == "__main__":
    unittest.main()
