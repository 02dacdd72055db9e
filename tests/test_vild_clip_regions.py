# Copyright (c) kd_detr contributors.
"""tools/precompute_clip_regions.py with a tiny random open_clip model on real coco128 images:
cached embeddings against a direct computation, resume, cache keys, proposal files."""
import importlib.util
import json
import math
import os
import pickle
import shutil
import tempfile
import unittest
import uuid

import numpy as np
import torch
from PIL import Image

from detectron2.structures import BoxMode

from kd_detr.ov.clip_regions import ClipRegionCache
from kd_detr.ov.region_proposals import load_proposals_file, top_proposals
from tests.common import REPO_ROOT, require_module, shared_data

NUM_IMAGES = 3


def tiny_clip_config(embed_dim):
    """A 1-layer, 32-wide open_clip (random init) with a 32-pixel image tower."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    }  # fmt: skip


def make_tiny_clip(tmp, embed_dim=16, seed=0):
    """(model name, checkpoint path, model) of a registered tiny open_clip model."""
    open_clip = require_module("open_clip")
    name = f"kd-vild-tiny-{uuid.uuid4().hex[:6]}"
    path = os.path.join(tmp, name + ".json")
    with open(path, "w") as f:
        json.dump(tiny_clip_config(embed_dim), f)
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    ckpt = os.path.join(tmp, f"{name}.pt")
    torch.save(model.state_dict(), ckpt)
    return name, ckpt, model


def coco128_subset(tmp, split="train2017", num=NUM_IMAGES, category_ids=None):
    """(json path, image root, coco dict) of the first ``num`` coco128 images annotated (with
    one of ``category_ids`` when given)."""
    src = shared_data("coco128", "annotations", f"instances_{split}.json")
    with open(src) as f:
        coco = json.load(f)
    wanted = [
        a for a in coco["annotations"] if category_ids is None or a["category_id"] in category_ids
    ]
    annotated = sorted({a["image_id"] for a in wanted})[:num]
    coco["images"] = [im for im in coco["images"] if im["id"] in annotated]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in annotated]
    path = os.path.join(tmp, f"coco128_{split}_{num}.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path, shared_data("coco128", split), coco


def proposals_json(tmp, coco, name="proposals.json"):
    """COCO-style proposals: each GT box, shifted copies and a whole-image box, scored."""
    rng = np.random.RandomState(0)
    entries = []
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        for dx in (0.0, 0.1):
            entries.append({"image_id": ann["image_id"], "bbox": [x + dx * w, y, w, h],
                            "score": float(rng.uniform())})  # fmt: skip
    for image_id, (width, height) in sizes.items():
        entries.append({"image_id": image_id, "bbox": [0, 0, width, height], "score": 0.5})
        entries.append({"image_id": image_id, "bbox": [5, 5, 0.5, 9], "score": 2.0})  # too thin
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def _load_tool():
    path = os.path.join(REPO_ROOT, "tools", "precompute_clip_regions.py")
    spec = importlib.util.spec_from_file_location("precompute_clip_regions_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _direct_embeddings(model, image, boxes):
    """Crops at 1x and 1.5x (outward-rounded, clipped), bicubic to 32x32, CLIP-normalised,
    encoded, normalised, averaged, normalised: written out independently of the library."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        feats = []
        for scale in (1.0, 1.5):
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale, (y1 - y0) * scale
            left, top = max(math.floor(cx - w / 2), 0), max(math.floor(cy - h / 2), 0)
            right = min(math.ceil(cx + w / 2), image.width)
            bottom = min(math.ceil(cy + h / 2), image.height)
            crop = image.crop((left, top, right, bottom)).resize((32, 32), Image.BICUBIC)
            pixels = torch.tensor(np.array(crop), dtype=torch.float32).permute(2, 0, 1) / 255
            with torch.no_grad():
                e = model.encode_image(((pixels - mean) / std)[None])[0]
            feats.append(e / e.norm())
        mean_feat = (feats[0] + feats[1]) / 2
        out.append(mean_feat / mean_feat.norm())
    return torch.stack(out).numpy()


class TestPrecomputeClipRegions(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.tmp = tempfile.mkdtemp(prefix="kd_vild_regions_")
        cls.model_name, cls.ckpt, cls.model = make_tiny_clip(cls.tmp)
        cls.json, cls.image_root, cls.coco = coco128_subset(cls.tmp)
        cls.proposals = proposals_json(cls.tmp, cls.coco)
        cls.tool = _load_tool()
        cls.args = [
            "--coco-json", cls.json, "--image-root", cls.image_root,
            "--proposals", cls.proposals, "--num-proposals", "4",
            "--model", cls.model_name, "--pretrained", cls.ckpt,
            "--output-root", os.path.join(cls.tmp, "cache"), "--batch-size", "3",
        ]  # fmt: skip
        cls.cache_dir = cls.tool.main(cls.args)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_embeddings_equal_direct_computation(self):
        cache = ClipRegionCache(self.cache_dir)
        props = load_proposals_file(self.proposals)
        for image in self.coco["images"]:
            entry = cache.load(image["id"])
            boxes, scores = props[str(image["id"])]
            keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
            order = np.argsort(-scores[keep], kind="stable")[:4]
            np.testing.assert_allclose(entry["boxes"], boxes[keep][order], atol=1e-4)
            np.testing.assert_allclose(entry["scores"], scores[keep][order], atol=1e-6)
            self.assertEqual(entry["embeddings"].shape, (len(order), 16))
            pil = Image.open(os.path.join(self.image_root, image["file_name"])).convert("RGB")
            expected = _direct_embeddings(self.model, pil, entry["boxes"])
            np.testing.assert_allclose(entry["embeddings"], expected, atol=2e-3, rtol=0)
            np.testing.assert_allclose(np.linalg.norm(entry["embeddings"], axis=1), 1, atol=2e-3)

    def test_resume_skips_done_images(self):
        cache = ClipRegionCache(self.cache_dir)
        paths = [cache.path(im["id"]) for im in self.coco["images"]]
        mtimes = [os.stat(p).st_mtime_ns for p in paths]
        os.remove(paths[1])
        self.assertEqual(self.tool.main(self.args), self.cache_dir)
        self.assertEqual(os.stat(paths[0]).st_mtime_ns, mtimes[0])
        self.assertEqual(os.stat(paths[2]).st_mtime_ns, mtimes[2])
        self.assertTrue(os.path.isfile(paths[1]))  # only the missing image was recomputed
        with open(os.path.join(self.cache_dir, "meta.json")) as f:
            meta = json.load(f)
        self.assertIn("--num-proposals 4", meta["command"])
        self.assertEqual(meta["key"]["model"]["embed_dim"], 16)

    def test_cache_key_follows_model_and_proposals(self):
        cache = ClipRegionCache(self.cache_dir)
        key = dict(cache.meta["key"])
        other_model = dict(key, model=dict(key["model"], name="another"))
        other_props = dict(key, proposals={"file": dict(key["proposals"]["file"], size=1)})
        hashes = {ClipRegionCache.key_hash(k) for k in (key, other_model, other_props)}
        self.assertEqual(len(hashes), 3)
        self.assertEqual(os.path.basename(self.cache_dir), ClipRegionCache.key_hash(key))
        # a different weights file (same model name) or proposals file: another folder
        _, ckpt2, _ = make_tiny_clip(self.tmp, seed=1)
        args = list(self.args)
        args[args.index(self.ckpt)] = ckpt2
        other = self.tool.main(args)
        self.assertNotEqual(other, self.cache_dir)
        props2 = proposals_json(self.tmp, self.coco, "proposals2.json")
        args = list(self.args)
        args[args.index(self.proposals)] = props2
        self.assertNotEqual(self.tool.main(args), self.cache_dir)

    def test_missing_entry_names_image_and_command(self):
        cache = ClipRegionCache(self.cache_dir)
        with self.assertRaisesRegex(FileNotFoundError, r"image 987654 \(x\.jpg\).*--num-proposals"):
            cache.load(987654, "x.jpg")
        with self.assertRaisesRegex(FileNotFoundError, "not a CLIP region cache"):
            ClipRegionCache(self.tmp)


class TestRPNProposalSource(unittest.TestCase):
    def test_tool_with_rpn_model(self):
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        from kd_detr.config import load_config

        torch.set_num_threads(1)
        tmp = tempfile.mkdtemp(prefix="kd_vild_rpn_")
        try:
            rpn_cfg = os.path.join(tmp, "rpn.yaml")
            cfg = load_config(
                os.path.join(REPO_ROOT, "configs", "demo", "faster_rcnn_efflite0_fpn_demo.yaml"),
                freeze=False,
                register_datasets=False,
            )
            cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False
            with open(rpn_cfg, "w") as f:
                f.write(cfg.dump())
            torch.manual_seed(0)
            weights = os.path.join(tmp, "rpn.pth")
            DetectionCheckpointer(build_model(cfg), save_dir=tmp).save("rpn")
            name, ckpt, _ = make_tiny_clip(tmp)
            json_file, image_root, coco = coco128_subset(tmp, num=1)
            cache_dir = _load_tool().main([
                "--coco-json", json_file, "--image-root", image_root, "--rpn-config", rpn_cfg,
                "--rpn-weights", weights, "--num-proposals", "20", "--model", name,
                "--pretrained", ckpt, "--output-root", os.path.join(tmp, "cache"),
            ])  # fmt: skip
            image = coco["images"][0]
            entry = ClipRegionCache(cache_dir).load(image["id"])
            boxes, scores = entry["boxes"], entry["scores"]
            self.assertEqual(len(boxes), 20)
            self.assertTrue(np.all(np.diff(scores) <= 0))  # by decreasing objectness
            self.assertTrue(np.all(boxes >= 0))
            self.assertTrue(np.all(boxes[:, [0, 2]] <= image["width"] + 1e-3))
            self.assertTrue(np.all(boxes[:, [1, 3]] <= image["height"] + 1e-3))
            # the RPN ran at 192 pixels (shortest side), its boxes clipped to the resized image:
            # boxes beyond the resized width show that they are scaled back to the image
            resized_width = image["width"] * 192 / min(image["width"], image["height"])
            self.assertGreater(boxes[:, 2].max(), resized_width)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class TestProposalFiles(unittest.TestCase):
    def test_detectron2_pkl_and_top_proposals(self):
        tmp = tempfile.mkdtemp(prefix="kd_vild_props_")
        try:
            xywh = np.array([[10, 20, 30, 40], [0, 0, 5, 0.5], [1, 2, 3, 4]], np.float32)
            path = os.path.join(tmp, "p.pkl")
            with open(path, "wb") as f:
                pickle.dump({"ids": [7], "boxes": [xywh], "objectness_logits": [
                    np.array([0.1, 3.0, 0.2], np.float32)], "bbox_mode": BoxMode.XYWH_ABS}, f)
            boxes, scores = load_proposals_file(path)["7"]
            np.testing.assert_allclose(boxes[0], [10, 20, 40, 60])
            top_b, top_s = top_proposals(boxes, scores, 5)
            np.testing.assert_allclose(top_s, [0.2, 0.1])  # the 0.5-high box is dropped
            np.testing.assert_allclose(top_b[0], [1, 2, 4, 6])
            with self.assertRaisesRegex(ValueError, "Unknown proposals file type"):
                load_proposals_file(os.path.join(tmp, "p.txt"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
