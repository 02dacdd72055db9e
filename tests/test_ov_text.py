# Copyright (c) kd_detr contributors.
"""Class text embeddings: the CLI with a tiny random open_clip model, and loading."""
import importlib.util
import json
import os
import shutil
import tempfile
import unittest
import uuid

import numpy as np
import torch
import torch.nn.functional as F

from kd_detr.ov.text_embeddings import (
    PROMPT_TEMPLATES,
    load_text_embeddings,
    lvis_class_names,
    read_names_file,
    read_sidecar,
)
from tests.common import REPO_ROOT, require_module, shared_data

# A tiny CLIP (random init): 1-layer, 32-wide text tower with the standard BPE tokenizer.
_TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _load_cli():
    path = os.path.join(REPO_ROOT, "tools", "build_text_embeddings.py")
    spec = importlib.util.spec_from_file_location("build_text_embeddings_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestBuildTextEmbeddings(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.open_clip = require_module("open_clip")
        cls.tmp = tempfile.mkdtemp(prefix="kd_ov_text_")
        cls.model_name = f"kd-tiny-clip-{uuid.uuid4().hex[:6]}"
        cls.model_cfg = os.path.join(cls.tmp, cls.model_name + ".json")
        with open(cls.model_cfg, "w") as f:
            json.dump(_TINY_CFG, f)
        cls.open_clip.add_model_config(cls.model_cfg)
        torch.manual_seed(0)
        cls.model = cls.open_clip.create_model(cls.model_name, pretrained=None).eval()
        cls.ckpt = os.path.join(cls.tmp, "tiny_clip.pt")
        torch.save(cls.model.state_dict(), cls.ckpt)

        cls.names_file = os.path.join(cls.tmp, "names.txt")
        with open(cls.names_file, "w") as f:
            f.write("cat\ntraffic light, stoplight\n\nred bicycle\n")
        cls.templates = ["a photo of a {}.", "there is a {} in the scene."]
        cls.templates_file = os.path.join(cls.tmp, "templates.txt")
        with open(cls.templates_file, "w") as f:
            f.write("\n".join(cls.templates) + "\n")
        cls.output = os.path.join(cls.tmp, "out", "custom.npy")
        args = ["--vocabulary", cls.names_file, "--templates", cls.templates_file]
        args += ["--model", cls.model_name, "--pretrained", cls.ckpt, "--output", cls.output]
        _load_cli().main(args)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_rows_match_hand_computation(self):
        emb = np.load(self.output)
        self.assertEqual(emb.dtype, np.float32)
        self.assertEqual(emb.shape, (3, 16))
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
        tokenizer = self.open_clip.get_tokenizer(self.model_name)
        classes = [["cat"], ["traffic light", "stoplight"], ["red bicycle"]]
        for row, names in zip(emb, classes):
            feats = []
            with torch.no_grad():
                for name in names:
                    for t in self.templates:
                        e = self.model.encode_text(tokenizer([t.format(name)]))[0]
                        feats.append(e / e.norm())
            expected = torch.stack(feats).mean(0)
            expected = expected / expected.norm()
            np.testing.assert_allclose(row, expected.numpy(), atol=1e-5)
        # the synonym changes the result: it is not ignored
        self.assertFalse(np.allclose(emb[0], emb[1], atol=1e-3))

    def test_sidecar(self):
        meta = read_sidecar(self.output)
        self.assertEqual(meta["names"], [["cat"], ["traffic light", "stoplight"], ["red bicycle"]])
        self.assertEqual(meta["model"], self.model_name)
        self.assertEqual(meta["pretrained"], self.ckpt)
        self.assertEqual(meta["templates"], self.templates)
        self.assertEqual((meta["num_classes"], meta["dim"], meta["normalized"]), (3, 16, True))

    def test_load_and_mismatch(self):
        emb = load_text_embeddings(self.output, expected_num=3, expected_dim=16)
        np.testing.assert_allclose(emb.numpy(), np.load(self.output), atol=1e-6)
        with self.assertRaisesRegex(ValueError, r"3 classes .* has 65"):
            load_text_embeddings(self.output, expected_num=65)
        with self.assertRaisesRegex(ValueError, r"dimension 16 .* expects 512.*EMBED_DIM"):
            load_text_embeddings(self.output, expected_dim=512)
        bad = os.path.join(self.tmp, "bad.npy")
        np.save(bad, np.zeros((2, 16), np.float32))
        with self.assertRaisesRegex(ValueError, "all-zero rows"):
            load_text_embeddings(bad)


class TestLoadAndNames(unittest.TestCase):
    def test_detic_coco_embeddings(self):
        path = shared_data("clip_text", "coco_clip_a+cname.npy")
        raw = np.load(path).astype(np.float32)
        self.assertGreater(np.linalg.norm(raw, axis=1).min(), 2.0)  # not unit length on disk
        emb = load_text_embeddings(path, expected_num=80, expected_dim=512)
        self.assertEqual(tuple(emb.shape), (80, 512))
        self.assertEqual(emb.dtype, torch.float32)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(80), atol=1e-5, rtol=0)
        cos = F.cosine_similarity(emb, torch.from_numpy(raw), dim=1)
        torch.testing.assert_close(cos, torch.ones(80), atol=1e-5, rtol=0)
        with self.assertRaisesRegex(ValueError, "80 classes .* 48"):
            load_text_embeddings(path, expected_num=48)

    def test_lvis_names_and_names_file(self):
        path = shared_data("clip_text", "lvis_v1_train_cat_info.json")
        names = lvis_class_names(path)
        self.assertEqual(len(names), 1203)
        self.assertTrue(all(len(n) == 1 and "_" not in n[0] for n in names))
        with_syn = lvis_class_names(path, synonyms=True)
        self.assertEqual([n[0] for n in with_syn], [n[0] for n in names])
        self.assertGreater(sum(len(n) for n in with_syn), 1203)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("a,b,a\n\n c \n")
        try:
            self.assertEqual(read_names_file(f.name), [["a", "b"], ["c"]])
        finally:
            os.remove(f.name)
        self.assertTrue(all("{}" in t for t in PROMPT_TEMPLATES["ensemble"]))
