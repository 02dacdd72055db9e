# Copyright (c) kd_detr contributors.
"""kd_detr RTDETR vs Hugging Face ``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection``
(random perturbed weights, float32, eval).

The Hugging Face model is saved with ``save_pretrained``, converted by
``tools/convert_checkpoint.py --source hf`` and loaded into the model of
``configs/tests/rt_detr_tiny_parity.yaml``; every decoder layer's logits and boxes, the selected
encoder tokens' logits and boxes and the initial reference boxes must match within 1e-4.
"""
import os
import unittest

import torch

from kd_detr.checkpoint import convert_hf_rt_detr, hf_rt_detr_config_mismatches
from kd_detr.modeling.meta_arch import RTDETR  # noqa: F401  (registers the model)

from .common import REPO_ROOT
from .hf_reference import TINY_REALTIME_HF, HFParityTestCase, parity_cfg, perturb_hf_weights
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "rt_detr_tiny_parity.yaml")
TOLERANCE = 1e-4
V2 = ["MODEL.RTDETR.VERSION", "2", "MODEL.RTDETR.DEC_N_POINTS", "[2, 2, 2]"]


def build_hf_rt_detr(transformers, seed: int = 0, v2: bool = False, **overrides):
    """The Hugging Face twin of the tiny parity config (ResNet-18-vd, d 64, 2 decoder layers),
    random weights perturbed so that no bias, head or normalisation keeps its initial value."""
    backbone = transformers.RTDetrResNetConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        layer_type="basic",
        embedding_size=64,
        out_indices=[2, 3, 4],
    )
    kwargs = dict(
        backbone_config=backbone,
        encoder_in_channels=[128, 256, 512],
        **TINY_REALTIME_HF,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    if v2:
        model = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**kwargs))
    else:
        model = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**kwargs))
    model = perturb_hf_weights(model.eval(), seed)
    with torch.no_grad():  # a derived constant (1 / points), not a weight
        for name, buf in model.named_buffers():
            if name.endswith("n_points_scale"):
                buf.fill_(1.0 / kwargs["decoder_n_points"])
    return model


def images(seed: int = 3):
    """(2, 3, 96, 128) pixel values in [0, 1] (Hugging Face's input; ours: mean 0, std 1 after
    the configs' 0-255 normalisation) and an all-False padding mask."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 96, 128, generator=gen), torch.zeros(2, 96, 128, dtype=torch.bool)


class TestRTDETRParity(HFParityTestCase):
    CONFIG = CONFIG

    def check(self, hf, opts=()):
        model = self.convert_and_load(self.save_hf(hf), opts)[0]
        x, mask = images()
        with torch.no_grad():
            ours = model.forward_raw((x, mask))
            theirs = hf(pixel_values=x)
        layers = ours["layers"]
        self.assertEqual(tuple(layers["pred_logits"].shape), (2, 2, 10, 5))
        pairs = [
            ("encoder logits", ours["enc_outputs"]["pred_logits"], theirs.enc_topk_logits),
            ("encoder boxes", ours["enc_outputs"]["pred_boxes"], theirs.enc_topk_bboxes),
            (
                "initial references",
                layers["reference_boxes"][0],
                theirs.init_reference_points.sigmoid(),
            ),
        ]
        for i in range(layers["pred_logits"].shape[0]):
            pairs += [
                (f"layer {i} logits", layers["pred_logits"][i], theirs.intermediate_logits[:, i]),
                (
                    f"layer {i} boxes",
                    layers["pred_boxes"][i],
                    theirs.intermediate_reference_points[:, i],
                ),
            ]
        pairs += [("final logits", ours["pred_logits"], theirs.logits)]
        diffs = {name: (a - b).abs().max().item() for name, a, b in pairs}
        print(f"max abs diff vs Hugging Face {type(hf).__name__}: {diffs}")
        for name, diff in diffs.items():
            self.assertLessEqual(diff, TOLERANCE, name)
        # Not degenerate: layers differ and the queries do not all predict the same box.
        self.assertGreater((layers["pred_boxes"][0] - layers["pred_boxes"][1]).abs().max(), 0.01)
        self.assertGreater(layers["pred_boxes"][-1].std(dim=1).mean().item(), 0.01)
        return model

    def test_parity_rt_detr(self):
        self.check(build_hf_rt_detr(self.transformers))

    def test_parity_trainable_backbone_norm(self):
        # R18vd / R34vd recipes train the backbone BatchNorm: the converter adds its counters.
        self.check(build_hf_rt_detr(self.transformers, seed=3), ["MODEL.RESNET_VD.NORM", "BN"])

    def test_parity_rt_detr_v2(self):
        self.check(build_hf_rt_detr(self.transformers, seed=1, v2=True), V2)

    def test_parity_rt_detr_v2_discrete(self):
        hf = build_hf_rt_detr(self.transformers, seed=2, v2=True, decoder_method="discrete")
        self.check(hf, V2 + ["MODEL.RTDETR.SAMPLING_METHOD", "discrete"])

    def test_config_mismatch_and_bad_keys(self):
        hf = build_hf_rt_detr(self.transformers)
        config = hf.config.to_dict()
        self.assertEqual(hf_rt_detr_config_mismatches(config, parity_cfg(CONFIG)), [])
        opts = ["MODEL.RTDETR.DEC_N_POINTS", "[4]", "MODEL.RESNET_VD.DEPTH", "34"]
        cfg = parity_cfg(CONFIG, opts)
        problems = hf_rt_detr_config_mismatches(config, cfg)
        self.assertIn("decoder_n_points=2 but MODEL.RTDETR.DEC_N_POINTS=[4]", problems)
        self.assertIn("backbone is ResNet-18vd but MODEL.RESNET_VD.DEPTH=34", problems)
        v2_config = build_hf_rt_detr(self.transformers, v2=True).config.to_dict()
        self.assertIn(
            "model_type 'rt_detr_v2' but MODEL.RTDETR.VERSION=1",
            hf_rt_detr_config_mismatches(v2_config, parity_cfg(CONFIG)),
        )
        state = dict(hf.state_dict())
        state["model.extra_head.weight"] = torch.zeros(1)
        with self.assertRaisesRegex(ValueError, "model.extra_head.weight"):
            convert_hf_rt_detr(state, config)


if __name__ == "__main__":
    unittest.main()
