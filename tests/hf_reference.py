# Copyright (c) kd_detr contributors.
"""Shared by the Hugging Face parity tests: the converter CLI, parity configs, the backbone
choice and weight perturbation of the Hugging Face twins, and a test case that saves a Hugging
Face model, converts it with the CLI and loads it into a kd_detr model."""
import os
import tempfile
import unittest

import torch

from detectron2.modeling import build_model

from .common import load_tool, require_module
from .model_helpers import assert_loads_strictly, config_from

# Transformer settings of the tiny Hugging Face RT-DETR(v2) / D-FINE twins of
# configs/tests/rt_detr_tiny_parity.yaml and dfine_tiny_parity.yaml (their backbones differ).
TINY_REALTIME_HF = dict(
    d_model=64,
    encoder_hidden_dim=64,
    decoder_in_channels=[64, 64, 64],
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    decoder_layers=2,
    num_queries=10,
    num_labels=5,
    decoder_n_points=2,
    num_denoising=6,
)


def load_convert_checkpoint_cli():
    """Import tools/convert_checkpoint.py (tools/ is not a package)."""
    return load_tool("convert_checkpoint.py")


def parity_cfg(config_file, opts=()):
    """kd_detr config of ``config_file`` with ``opts`` (KEY VALUE ...) merged in."""
    return config_from(config_file, *opts)


def hf_backbone_kwargs(transformers, hf_resnet, out_features):
    """Config kwargs of a Hugging Face DETR-family model's ResNet-18 backbone: transformers' own
    ResNet with stages ``out_features`` when ``hf_resnet``, else timm's (random weights)."""
    if not hf_resnet:
        return dict(backbone="resnet18", use_pretrained_backbone=False)
    resnet = transformers.ResNetConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        layer_type="basic",
        out_features=list(out_features),
    )
    return dict(backbone_config=resnet)


def perturb_hf_weights(model, seed=0):
    """Add N(0, 0.1) noise to every float parameter and buffer, running variances drawn from
    U(0.5, 1.5), so that no bias, head or normalisation parameter keeps its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
    return model


class HFParityTestCase(unittest.TestCase):
    """Needs transformers (``cls.transformers``), timm and safetensors; ``cls.cli`` is
    tools/convert_checkpoint.py and every test gets a temporary folder ``self.tmp``.

    Subclasses set ``CONFIG``, the kd_detr config the Hugging Face model is converted for.
    """

    CONFIG = None

    @classmethod
    def setUpClass(cls):
        cls.transformers = require_module("transformers")
        require_module("timm")
        require_module("safetensors")
        cls.cli = load_convert_checkpoint_cli()

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def save_hf(self, hf):
        """Check that no bias has a zero entry, then ``save_pretrained``; returns the folder."""
        zero_biases = [n for n, p in hf.named_parameters() if n.endswith("bias") and (p == 0).any()]
        self.assertEqual(zero_biases, [])
        folder = os.path.join(self.tmp, "hf")
        hf.save_pretrained(folder)
        return folder

    def convert_and_load(self, folder, opts=()):
        """Convert ``folder`` with the CLI and load the result with ``DetectionCheckpointer``,
        which must report no missing, unexpected or wrongly shaped keys.

        Returns:
            tuple[nn.Module, str]: our model in eval mode and the converted checkpoint's path.
        """
        output = os.path.join(self.tmp, "converted.pth")
        self.cli.main(
            ["--overwrite", "--source", "hf", "--config-file", self.CONFIG, folder, output, *opts]
        )
        model = build_model(parity_cfg(self.CONFIG, opts)).eval()
        assert_loads_strictly(self, model, output)
        return model, output
