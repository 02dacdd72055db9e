# Copyright (c) kd_detr contributors.
"""Shared by the Hugging Face parity tests: the converter CLI, parity configs and a test case
that saves a Hugging Face model, converts it with the CLI and loads it into a kd_detr model."""
import importlib.util
import os
import tempfile
import unittest
from unittest import mock

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from kd_detr import add_kd_detr_config

from .common import REPO_ROOT, require_module


def load_convert_checkpoint_cli():
    """Import tools/convert_checkpoint.py (tools/ is not a package)."""
    path = os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py")
    spec = importlib.util.spec_from_file_location("kd_detr_convert_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parity_cfg(config_file, opts=()):
    """kd_detr config of ``config_file`` with ``opts`` (KEY VALUE ...) merged in."""
    cfg = get_cfg()
    add_kd_detr_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


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
        self.cli.main(["--source", "hf", "--config-file", self.CONFIG, folder, output, *opts])
        model = build_model(parity_cfg(self.CONFIG, opts)).eval()
        checkpointer = DetectionCheckpointer(model)
        with mock.patch.object(checkpointer, "_log_incompatible_keys") as log:
            checkpointer.load(output)
        incompatible = log.call_args[0][0]
        self.assertEqual(incompatible.missing_keys, [])
        self.assertEqual(incompatible.unexpected_keys, [])
        self.assertEqual(incompatible.incorrect_shapes, [])
        return model, output
