# Copyright (c) kd_detr contributors.
"""tools/ov_demo.py with a tiny random open_clip text encoder and a tiny DAB-DETR OV model."""
import importlib.util
import json
import os
import shutil
import tempfile
import unittest
import uuid

import numpy as np
import torch
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from kd_detr.config import load_config
from kd_detr.ov.text_embeddings import save_text_embeddings
from tests.common import REPO_ROOT, require_module

# A tiny CLIP (random init) with 16-d embeddings and the standard BPE tokenizer.
_TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
_TINY_MODEL_YAML = """_BASE_: "{base}"
MODEL:
  DETR:
    NUM_CLASSES: 5
    CLASS_HEAD: "region_text"
  OV:
    TEXT_EMBEDDINGS: "{train}"
    EMBED_DIM: 16
    BACKGROUND: "none"
    TEMPERATURE: 0.02
INPUT:
  MIN_SIZE_TEST: 96
  MAX_SIZE_TEST: 160
"""


def save_checkpoint_and_image(directory, model, name):
    """Save ``model`` as ``directory/name.pth`` and a random 150 x 120 RGB image; return both
    paths (the demo's weights and input)."""
    DetectionCheckpointer(model, save_dir=directory).save(name)
    image = os.path.join(directory, "street.jpg")
    pixels = np.random.RandomState(1).randint(0, 255, (120, 150, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(image)
    return os.path.join(directory, f"{name}.pth"), image


def _load_demo():
    path = os.path.join(REPO_ROOT, "tools", "ov_demo.py")
    spec = importlib.util.spec_from_file_location("kd_ov_demo_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestOVDemo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        open_clip = require_module("open_clip")
        cls.tmp = tempfile.mkdtemp(prefix="kd_ov_demo_test_")
        cls.clip_name = f"kd-tiny-clip-{uuid.uuid4().hex[:6]}"
        cls.clip_cfg = os.path.join(cls.tmp, cls.clip_name + ".json")
        with open(cls.clip_cfg, "w") as f:
            json.dump(_TINY_CLIP, f)
        open_clip.add_model_config(cls.clip_cfg)
        torch.manual_seed(0)
        clip = open_clip.create_model(cls.clip_name, pretrained=None)
        cls.clip_ckpt = os.path.join(cls.tmp, "tiny_clip.pt")
        torch.save(clip.state_dict(), cls.clip_ckpt)

        train = os.path.join(cls.tmp, "train.npy")
        np.save(train, np.random.RandomState(0).randn(5, 16).astype(np.float32))
        base = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
        cls.config = os.path.join(cls.tmp, "tiny_ov.yaml")
        with open(cls.config, "w") as f:
            f.write(_TINY_MODEL_YAML.format(base=base, train=train))
        cfg = load_config(cls.config, freeze=False, register_datasets=False)
        model = build_model(cfg)
        cls.weights, cls.image = save_checkpoint_and_image(cls.tmp, model, "tiny_ov")
        cls.demo = _load_demo()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_demo(self, *extra):
        out = os.path.join(self.tmp, f"out_{uuid.uuid4().hex[:6]}")
        args = ["--config-file", self.config, "--weights", self.weights, "--input", self.image,
                "--output", out, "--confidence-threshold", "0.0"]  # fmt: skip
        return self.demo.main(args + list(extra))

    def test_names_through_the_text_encoder(self):
        results = self.run_demo(
            "--vocabulary", "cat,dog,umbrella", "--clip-model", self.clip_name,
            "--clip-pretrained", self.clip_ckpt, "--clip-model-config", self.clip_cfg,
        )  # fmt: skip
        self.assertEqual(len(results), 1)
        with Image.open(results[0]["output"]) as drawn:
            self.assertEqual(drawn.size, (150, 120))  # (width, height) of the input
        classes = results[0]["instances"].pred_classes
        self.assertEqual(len(classes), 20)  # TEST_TOPK of the tiny model, threshold 0
        self.assertTrue(bool(((classes >= 0) & (classes < 3)).all()))

    def test_embeddings_file_with_sidecar_and_subset(self):
        path = os.path.join(self.tmp, "custom.npy")
        emb = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
        save_text_embeddings(path, emb, {"names": [["cat"], ["dog"], ["bus"], ["kite"]]})
        results = self.run_demo("--text-embeddings", path, "--vocabulary", "kite,cat")
        classes = results[0]["instances"].pred_classes
        self.assertTrue(bool(((classes >= 0) & (classes < 2)).all()))
        results = self.run_demo("--text-embeddings", path, "--confidence-threshold", "0.5")
        scores = results[0]["instances"].scores
        self.assertTrue(bool((scores >= 0.5).all()))
        self.assertTrue(os.path.isfile(results[0]["output"]))

    def test_embedding_size_mismatch_is_a_clear_error(self):
        path = os.path.join(self.tmp, "wide.npy")
        save_text_embeddings(path, torch.randn(3, 32), {"names": [["a"], ["b"], ["c"]]})
        with self.assertRaisesRegex(ValueError, r"size 32 but the model was built for size 16"):
            self.run_demo("--text-embeddings", path)
        with self.assertRaisesRegex(ValueError, "Give --vocabulary"):
            self.run_demo()


if __name__ == "__main__":
    unittest.main()
