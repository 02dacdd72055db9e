# Copyright (c) kd_detr contributors.
"""kd_detr DABDETR vs Hugging Face ``DabDetrForObjectDetection`` (random weights, float32, eval).

The Hugging Face model is saved with ``save_pretrained``, converted by
``tools/convert_checkpoint.py --source hf`` and loaded into the model of
``configs/tests/dab_detr_tiny_parity.yaml``; every decoder layer's logits, boxes and input
anchors must match. Hugging Face's per-layer outputs are its decoder's normalised hidden states
and reference points with the heads applied as ``DabDetrForObjectDetection.forward`` does.
"""
import os
import unittest

import torch

from kd_detr.checkpoint import convert_hf_dab_detr, hf_dab_detr_config_mismatches
from kd_detr.modeling.meta_arch import DABDETR  # noqa: F401  (registers DABDETR)

from .common import REPO_ROOT
from .hf_reference import HFParityTestCase, hf_backbone_kwargs, parity_cfg, perturb_hf_weights

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
TOLERANCE = 1e-4


def tiny_cfg(opts=()):
    return parity_cfg(CONFIG, opts)


def build_hf_dab_detr(transformers, seed: int = 0, hf_resnet: bool = False, **overrides):
    """The Hugging Face twin of the parity config; random weights perturbed so that no bias,
    box-head weight or normalisation parameter keeps its constant initial value."""
    kwargs = dict(
        hidden_size=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=10,
        num_labels=5,
        dropout=0.0,
    )
    kwargs.update(overrides)
    kwargs.update(hf_backbone_kwargs(transformers, hf_resnet, ["stage4"]))
    torch.manual_seed(seed)
    model = transformers.DabDetrForObjectDetection(transformers.DabDetrConfig(**kwargs)).eval()
    return perturb_hf_weights(model, seed)


def padded_batch(seed: int = 1):
    """Two normalised images (96x128 and 64x96) zero-padded to 96x128, and the padding mask."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(2, 3, 96, 128)
    mask = torch.ones(2, 96, 128, dtype=torch.bool)
    for i, (h, w) in enumerate([(96, 128), (64, 96)]):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        mask[i, :h, :w] = False
    return images, mask


def hf_layer_outputs(hf, images, mask):
    """Hugging Face logits (L, B, Q, C), boxes and input anchors (L, B, Q, 4) of every layer."""
    from transformers.models.dab_detr.modeling_dab_detr import inverse_sigmoid

    out = hf.model(pixel_values=images, pixel_mask=(~mask).long())
    hidden, refs = out.intermediate_hidden_states, out.reference_points
    boxes = (hf.bbox_predictor(hidden) + inverse_sigmoid(refs)).sigmoid()
    return hf.class_embed(hidden), boxes, refs


class TestDABDETRParity(HFParityTestCase):
    CONFIG = CONFIG

    def convert_hf(self, hf, opts=()):
        """save_pretrained -> CLI -> DetectionCheckpointer; returns our model in eval mode."""
        return self.convert_and_load(self.save_hf(hf), opts)[0]

    def assert_parity(self, model, hf, num_layers, num_queries):
        images, mask = padded_batch()
        with torch.no_grad():
            ours = model.forward_raw((images, mask))["layers"]
            theirs = hf_layer_outputs(hf, images, mask)
            final = hf(pixel_values=images, pixel_mask=(~mask).long())
        self.assertEqual(tuple(ours["pred_logits"].shape), (num_layers, 2, num_queries, 5))
        for name, a, b in [
            ("logits", ours["pred_logits"], theirs[0]),
            ("boxes", ours["pred_boxes"], theirs[1]),
            ("input anchors", ours["reference_boxes"], theirs[2]),
            ("final logits", ours["pred_logits"][-1], final.logits),
            ("final boxes", ours["pred_boxes"][-1], final.pred_boxes),
        ]:
            self.assertLessEqual((a - b).abs().max().item(), TOLERANCE, name)
        # Not degenerate: the refinement moved the boxes away from the anchors.
        self.assertGreater((ours["pred_boxes"] - ours["reference_boxes"]).abs().max().item(), 0.02)

    def test_parity_timm_resnet18(self):
        hf = build_hf_dab_detr(self.transformers)
        self.assert_parity(self.convert_hf(hf), hf, num_layers=2, num_queries=10)

    def test_parity_hf_resnet18_patterns_keep_query_pos(self):
        hf = build_hf_dab_detr(
            self.transformers,
            seed=1,
            hf_resnet=True,
            decoder_layers=3,
            num_patterns=3,
            keep_query_pos=True,
        )
        opts = ["MODEL.DETR.DEC_LAYERS", "3", "MODEL.DETR.DAB.NUM_PATTERNS", "3"]
        model = self.convert_hf(hf, opts + ["MODEL.DETR.DAB.KEEP_QUERY_POS", "True"])
        self.assert_parity(model, hf, num_layers=3, num_queries=30)

    def test_config_mismatch_and_bad_keys(self):
        hf = build_hf_dab_detr(self.transformers)
        config = hf.config.to_dict()
        self.assertEqual(hf_dab_detr_config_mismatches(config, tiny_cfg()), [])
        cfg = tiny_cfg(["MODEL.DETR.DAB.TEMPERATURE", "10.0", "MODEL.DETR.NUM_QUERIES", "12"])
        problems = hf_dab_detr_config_mismatches(config, cfg)
        self.assertIn("temperature_height=20 but MODEL.DETR.DAB.TEMPERATURE=10.0", problems)
        self.assertIn("num_queries=10 but MODEL.DETR.NUM_QUERIES=12", problems)
        state = dict(hf.state_dict())
        state["model.extra_head.weight"] = torch.zeros(1)
        with self.assertRaisesRegex(ValueError, "model.extra_head.weight"):
            convert_hf_dab_detr(state, config)


if __name__ == "__main__":
    unittest.main()
