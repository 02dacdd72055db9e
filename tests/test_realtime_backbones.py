# Copyright (c) kd_detr contributors.
"""The real-time family's backbones: ResNet-vd (RT-DETR) and HGNetv2 (D-FINE) equal
transformers' ``RTDetrResNetBackbone`` / ``HGNetV2Backbone`` after key renaming, build from the
config with the shapes the Hugging Face configs use, and reject bad settings clearly."""
import unittest

import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from kd_detr.checkpoint.hf_backbones import hf_hgnetv2_key, hf_resnet_vd_key
from kd_detr.config import load_config
from kd_detr.modeling.backbone import HGNetV2, ResNetVD

from .common import require_module
from .hf_reference import perturb_hf_weights
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

# A PP-HGNetV2-B0-like architecture (D-FINE-N/S), LAB on.
B0 = dict(
    stem_channels=[3, 16, 16],
    stage_in_channels=[16, 64, 256, 512],
    stage_mid_channels=[16, 32, 64, 128],
    stage_out_channels=[64, 256, 512, 1024],
    stage_num_blocks=[1, 1, 2, 1],
    stage_numb_of_layers=[3, 3, 3, 3],
    use_learnable_affine_block=True,
)


def load_renamed(test, model, hf_state, rename):
    """Load ``hf_state`` renamed by ``rename`` (which keeps no ``num_batches_tracked``) into
    ``model``: every other key must be renamed and the model must miss nothing else."""
    state = {}
    for key, value in hf_state.items():
        new = rename(key)
        if new is None:
            test.assertTrue(key.endswith("num_batches_tracked"), key)
        else:
            state[new] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    test.assertEqual([k for k in missing if not k.endswith("num_batches_tracked")], [])
    test.assertEqual(unexpected, [])


class TestAgainstTransformers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t = require_module("transformers")

    def compare(self, ours, hf, names, size=(2, 3, 96, 128)):
        x = torch.rand(*size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = ours.eval()(x), hf.eval()(x).feature_maps
        self.assertEqual(list(a), names)
        for name, theirs in zip(names, b):
            torch.testing.assert_close(a[name], theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max())

    def test_resnet_vd_18_and_50(self):
        t = self.t
        for depth, kwargs in [
            (18, dict(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512])),
            (50, {}),
        ]:
            with self.subTest(depth=depth):
                torch.manual_seed(depth)
                config = t.RTDetrResNetConfig(out_indices=[2, 3, 4], **kwargs)
                hf = perturb_hf_weights(t.RTDetrResNetBackbone(config), seed=depth)
                ours = ResNetVD(depth, norm="BN")
                load_renamed(self, ours, hf.state_dict(), hf_resnet_vd_key)
                self.compare(ours, hf, ["res3", "res4", "res5"])
                channels = [s.channels for s in ours.output_shape().values()]
                self.assertEqual(channels, list(config.hidden_sizes[1:]))

    def test_hgnetv2_default_b4_and_b0_with_lab(self):
        t = self.t
        for name, kwargs in [("B4", {}), ("B0", B0)]:
            with self.subTest(arch=name):
                torch.manual_seed(0)
                config = t.HGNetV2Config(out_features=["stage2", "stage3", "stage4"], **kwargs)
                hf = perturb_hf_weights(t.HGNetV2Backbone(config))
                ours = HGNetV2(
                    stem_channels=config.stem_channels,
                    stage_in_channels=config.stage_in_channels,
                    stage_mid_channels=config.stage_mid_channels,
                    stage_out_channels=config.stage_out_channels,
                    stage_num_blocks=config.stage_num_blocks,
                    stage_num_layers=config.stage_numb_of_layers,
                    use_lab=config.use_learnable_affine_block,
                    norm="BN",
                )
                load_renamed(self, ours, hf.state_dict(), hf_hgnetv2_key)
                self.compare(ours, hf, ["stage2", "stage3", "stage4"])


class TestFromConfig(unittest.TestCase):
    def test_builders_shapes_and_frozen_stages(self):
        cfg = load_config(opts=[
            "MODEL.BACKBONE.NAME", "build_resnet_vd_backbone", "MODEL.RESNET_VD.DEPTH", "34",
            "MODEL.RESNET_VD.FREEZE_AT", "2",
        ])  # fmt: skip
        backbone = build_backbone(cfg, ShapeSpec(channels=3))
        shapes = {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()}
        self.assertEqual(shapes, {"res3": (128, 8), "res4": (256, 16), "res5": (512, 32)})
        frozen = {n.split(".")[0] for n, p in backbone.named_parameters() if not p.requires_grad}
        self.assertEqual(frozen, {"stem", "res2"})
        cfg = load_config(opts=["MODEL.BACKBONE.NAME", "build_hgnetv2_backbone"])
        backbone = build_backbone(cfg, ShapeSpec(channels=3))
        shapes = {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()}
        self.assertEqual(shapes, {"stage2": (512, 8), "stage3": (1024, 16), "stage4": (2048, 32)})
        out = backbone(torch.rand(1, 3, 64, 64))
        self.assertEqual(tuple(out["stage4"].shape), (1, 2048, 2, 2))

    def test_bad_settings_name_the_key(self):
        with self.assertRaisesRegex(ValueError, "MODEL.RESNET_VD.DEPTH"):
            ResNetVD(152)
        with self.assertRaisesRegex(ValueError, "MODEL.RESNET_VD.OUT_FEATURES"):
            ResNetVD(18, out_features=["res6"])
        with self.assertRaisesRegex(ValueError, "MODEL.HGNETV2.STAGE_"):
            HGNetV2(stage_num_blocks=[1, 1, 3])
        with self.assertRaisesRegex(ValueError, "MODEL.HGNETV2.OUT_FEATURES"):
            HGNetV2(out_features=["stage5"])


if __name__ == "__main__":
    unittest.main()
