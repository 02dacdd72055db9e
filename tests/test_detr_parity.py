# Copyright (c) kd_detr contributors.
"""kd_detr DETR vs Hugging Face ``DetrForObjectDetection`` (random weights, float32, eval).

The Hugging Face model is saved with ``save_pretrained``, converted by
``tools/convert_checkpoint.py --source hf`` and loaded into the model of
``configs/tests/detr_tiny_parity.yaml``; every decoder layer's logits and boxes must match.

Hugging Face reference per layer: with ``auxiliary_loss=False`` (the DETR forward pass),
``decoder_hidden_states[l + 1]`` is layer l's raw output for l < L - 1, so its logits are the
heads applied after ``decoder.layernorm``; the last layer is the model's own output.
(``auxiliary_loss=True`` is not used: it feeds the normalised states to the next layer, which
changes the forward pass relative to DETR.)
"""
import json
import os
import unittest

import torch

from detectron2.modeling import build_model

from kd_detr.checkpoint import check_state_dict_keys, convert_hf_detr
from kd_detr.modeling.meta_arch import DETR  # noqa: F401  (registers DETR)

from .common import REPO_ROOT
from .hf_reference import HFParityTestCase, hf_backbone_kwargs, parity_cfg

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")
TOLERANCE = 1e-4


def _hf_config(transformers, backbone):
    kwargs = dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=10,
        num_labels=5,
        auxiliary_loss=False,
    )
    if backbone.startswith("resnet"):  # timm
        return transformers.DetrConfig(use_timm_backbone=True, backbone=backbone, **kwargs)
    resnet = hf_backbone_kwargs(transformers, True, ["stage4"])
    return transformers.DetrConfig(**resnet, **kwargs)


def _perturb_(model, seed=0):
    """Make every float parameter/buffer distinctive: no zero bias, non-trivial norms/BN stats."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(0.5 + r)
            elif name.endswith("running_mean"):
                t.copy_(0.2 * (r - 0.5))
            elif t.dim() == 1 and name.endswith("weight"):  # BatchNorm / LayerNorm scales
                t.copy_(0.75 + 0.5 * r)
            elif t.dim() == 1:  # biases: shifted away from 0
                t.add_(0.2 * (r - 0.5) + 0.05 * torch.sign(r - 0.5))
            elif "query_position_embeddings" in name:  # distinct queries
                t.copy_(torch.randn(t.shape, generator=gen))
            elif t.dim() == 2:  # linear layers: O(1) outputs
                t.copy_(torch.randn(t.shape, generator=gen) / t.shape[1] ** 0.5)
            else:  # convolutions: keep the backbone's init scale
                t.mul_(0.9 + 0.2 * r)


def _inputs(seed=1):
    """Two normalised images of different sizes, zero-padded to 96x96, and the padding mask."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    mask[0, 70:, :] = True
    mask[0, :, 90:] = True
    mask[1, :, 64:] = True
    images = torch.randn(2, 3, 96, 96, generator=gen).masked_fill(mask[:, None], 0.0)
    return images, mask


class TestDETRParity(HFParityTestCase):
    CONFIG = CONFIG

    def _save_hf(self, backbone):
        torch.manual_seed(0)
        hf = self.transformers.DetrForObjectDetection(_hf_config(self.transformers, backbone))
        _perturb_(hf.eval())
        return hf, self.save_hf(hf)

    def _check_parity(self, backbone, opts=()):
        hf, folder = self._save_hf(backbone)
        ours, output = self.convert_and_load(folder, opts)
        ours.load_state_dict(torch.load(output)["model"], strict=True)

        images, mask = _inputs()
        with torch.no_grad():
            out = hf(pixel_values=images, pixel_mask=(~mask).long(), output_hidden_states=True)
            norm = hf.model.decoder.layernorm
            states = [norm(h) for h in out.decoder_hidden_states[1:-1]]
            ref_logits = [hf.class_labels_classifier(h) for h in states] + [out.logits]
            ref_boxes = [hf.bbox_predictor(h).sigmoid() for h in states] + [out.pred_boxes]
            raw = ours.forward_raw((images, mask))
        self.assertEqual(len(ref_logits), 3)
        for layer in range(3):
            for ref, got in (
                (ref_logits[layer], raw["layers"]["pred_logits"][layer]),
                (ref_boxes[layer], raw["layers"]["pred_boxes"][layer]),
            ):
                self.assertEqual(got.shape, ref.shape)
                diff = (got - ref).abs().max().item()
                self.assertLessEqual(diff, TOLERANCE, f"{backbone} backbone, decoder layer {layer}")
        torch.testing.assert_close(raw["pred_logits"], out.logits, rtol=0, atol=TOLERANCE)

    def test_parity_timm_resnet18(self):
        self._check_parity("resnet18")

    def test_parity_timm_resnet50(self):
        opts = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"]
        self._check_parity("resnet50", opts)

    def test_parity_hf_resnet18(self):
        self._check_parity("hf_resnet")

    def test_cli_rejects_unsupported_model_type(self):
        folder = os.path.join(self.tmp, "yolos")
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "yolos"}, f)
        torch.save({}, os.path.join(folder, "pytorch_model.bin"))
        argv = ["--source", "hf", "--config-file", CONFIG, folder, os.path.join(self.tmp, "o.pth")]
        with self.assertRaisesRegex(ValueError, "Unsupported Hugging Face model type 'yolos'"):
            self.cli.main(argv)

    def test_cli_rejects_config_mismatch(self):
        _, folder = self._save_hf("resnet18")
        argv = ["--source", "hf", "--config-file", CONFIG, folder, os.path.join(self.tmp, "o.pth")]
        with self.assertRaisesRegex(ValueError, "num_queries=10 but MODEL.DETR.NUM_QUERIES=12"):
            self.cli.main(argv + ["MODEL.DETR.NUM_QUERIES", "12"])

    def test_converter_lists_bad_keys(self):
        hf, _ = self._save_hf("resnet18")
        state = dict(hf.state_dict())
        config = hf.config.to_dict()
        state["model.extra_head.weight"] = torch.zeros(1)
        with self.assertRaisesRegex(ValueError, "model.extra_head.weight"):
            convert_hf_detr(state, config)
        del state["model.extra_head.weight"]
        converted = convert_hf_detr(state, config)
        del converted["class_embed.bias"]
        with self.assertRaisesRegex(ValueError, r"missing \(1\): \['class_embed.bias'\]"):
            check_state_dict_keys(converted, build_model(parity_cfg(CONFIG)).eval().state_dict())


if __name__ == "__main__":
    unittest.main()
