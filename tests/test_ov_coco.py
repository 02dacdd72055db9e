# Copyright (c) kd_detr contributors.
"""COCO-OVD split jsons and novel / base / all AP50, against pycocotools."""
import contextlib
import copy
import io
import json
import math
import os
import unittest
import uuid
from collections import defaultdict

import numpy as np
import torch

from detectron2.structures import Boxes, Instances

from kd_detr.ov import (
    COCO_OVD_BASE_IDS,
    COCO_OVD_IDS,
    COCO_OVD_NOVEL_IDS,
    COCOOVDEvaluator,
    build_coco_ovd_json,
    register_coco_ovd,
)
from tests.common import TempDatasetsCase, require_module, shared_data

DATASETS = ("coco128", "tiny_coco")


def _load(name):
    path = shared_data(name, "annotations", "instances_val2017.json")
    with open(path) as f:
        return path, json.load(f)


def _q(v):
    return round(v * 4) / 4  # quarter pixels: exact in float32


def _perturbed_predictions(gt, seed):
    """Noisy detections (dataset ids, XYWH) from the ground truth, plus false positives."""
    rng = np.random.RandomState(seed)
    by_image = defaultdict(list)
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    dets = []
    for image in sorted(gt["images"], key=lambda im: im["id"]):
        W, H = image["width"], image["height"]
        boxes = [(a["category_id"], a["bbox"]) for a in by_image[image["id"]] if rng.rand() > 0.2]
        boxes += [
            (int(rng.choice(cat_ids)), [rng.uniform(0, W / 2), rng.uniform(0, H / 2), 60.0, 50.0])
            for _ in range(rng.poisson(1.0))
        ]
        for cat, (x, y, w, h) in boxes:
            x, y = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
            w, h = w * math.exp(rng.normal(0, 0.12)), h * math.exp(rng.normal(0, 0.12))
            x1, y1 = min(max(_q(x), 0.0), W - 2.0), min(max(_q(y), 0.0), H - 2.0)
            x2, y2 = min(max(_q(x + w), x1 + 1.0), W), min(max(_q(y + h), y1 + 1.0), H)
            score = float(np.float32(rng.uniform(0.01, 1.0)))
            dets.append(
                {"image_id": image["id"], "category_id": cat, "score": score,
                 "bbox": [x1, y1, x2 - x1, y2 - y1]}
            )  # fmt: skip
    return dets


def _pycocotools_split_ap50(gt_path, dets):
    """{"novel"|"base"|"all": (per-class mean AP50 in percent, #classes)} from pycocotools."""
    require_module("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
    ap50 = {}
    for k, cat in enumerate(ev.params.catIds):
        p = ev.eval["precision"][0, :, k, 0, -1]
        if (p > -1).any():
            ap50[cat] = float(np.mean(p[p > -1]))
    out = {}
    for split, ids in (("novel", COCO_OVD_NOVEL_IDS), ("base", COCO_OVD_BASE_IDS)):
        vals = [ap50[c] for c in ids if c in ap50]
        out[split] = (100.0 * float(np.mean(vals)), len(vals))
    vals = [ap50[c] for c in COCO_OVD_IDS if c in ap50]
    out["all"] = (100.0 * float(np.mean(vals)), len(vals))
    return out


class TestCocoOvdSplit(unittest.TestCase):
    def test_split_ids(self):
        self.assertEqual((len(COCO_OVD_BASE_IDS), len(COCO_OVD_NOVEL_IDS)), (48, 17))
        self.assertFalse(set(COCO_OVD_BASE_IDS) & set(COCO_OVD_NOVEL_IDS))
        self.assertEqual(len(COCO_OVD_IDS), 65)

    def test_train_and_val_contents(self):
        for name in DATASETS:
            _, coco = _load(name)
            train = build_coco_ovd_json(coco, "train")
            self.assertEqual(sorted(c["id"] for c in train["categories"]), list(COCO_OVD_BASE_IDS))
            base = set(COCO_OVD_BASE_IDS)
            self.assertTrue(all(a["category_id"] in base for a in train["annotations"]))
            n_base = sum(a["category_id"] in COCO_OVD_BASE_IDS for a in coco["annotations"])
            self.assertEqual(len(train["annotations"]), n_base)
            with_base = {a["image_id"] for a in coco["annotations"] if a["category_id"] in base}
            self.assertEqual({im["id"] for im in train["images"]}, with_base)
            # the rule drops something on these sets: images with only novel / other classes
            self.assertLess(len(train["images"]), len(coco["images"]), name)
            self.assertEqual(train["info"]["ovd"]["vocabulary"], 48)

            val = build_coco_ovd_json(coco, "val")
            self.assertEqual(sorted(c["id"] for c in val["categories"]), list(COCO_OVD_IDS))
            self.assertTrue(all(a["category_id"] in COCO_OVD_IDS for a in val["annotations"]))
            annotated_images = {a["image_id"] for a in val["annotations"]}
            self.assertEqual({im["id"] for im in val["images"]}, annotated_images)
            self.assertTrue(any(a["category_id"] in COCO_OVD_NOVEL_IDS for a in val["annotations"]))
            val80 = build_coco_ovd_json(coco, "val", vocabulary=80)
            self.assertEqual(len(val80["categories"]), 80)
            self.assertEqual(val80["annotations"], val["annotations"])
            self.assertEqual(val80["info"]["ovd"]["vocabulary"], 80)
            self.assertNotIn("ovd", coco.get("info", {}))  # the source is left untouched
        with self.assertRaisesRegex(ValueError, "65 .* or 80"):
            build_coco_ovd_json(coco, "val", vocabulary=48)


class TestCocoOvdEvaluator(TempDatasetsCase):
    tmp_prefix = "kd_ov_coco_"

    def _evaluate(self, dataset, vocabulary, seed):
        src, _ = _load(dataset)
        name = f"kd_test_ovd_{dataset}_{uuid.uuid4().hex[:6]}"
        image_root = shared_data(dataset, "val2017")
        path = register_coco_ovd(name, src, image_root, "val", self.tmp, vocabulary=vocabulary)
        self.names.append(name)
        again = register_coco_ovd(name, src, image_root, "val", self.tmp, vocabulary)
        self.assertEqual(path, again)  # cached
        with open(path) as f:
            gt = json.load(f)
        dets = _perturbed_predictions(gt, seed)
        contiguous = {c: i for i, c in enumerate(sorted(c["id"] for c in gt["categories"]))}
        evaluator = COCOOVDEvaluator(name, distributed=False)
        evaluator.reset()
        by_image = defaultdict(list)
        for d in dets:
            by_image[d["image_id"]].append(d)
        for image in gt["images"]:
            ds = by_image[image["id"]]
            inst = Instances((image["height"], image["width"]))
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ds)]
            inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([d["score"] for d in ds], dtype=torch.float32)
            inst.pred_classes = torch.tensor([contiguous[d["category_id"]] for d in ds]).long()
            evaluator.process([{"image_id": image["id"]}], [{"instances": inst}])
        return path, dets, evaluator.evaluate()["bbox"], evaluator

    def test_split_ap50_matches_pycocotools(self):
        for seed, (dataset, vocabulary) in enumerate(
            [("coco128", 65), ("tiny_coco", 65), ("coco128", 80)]
        ):
            path, dets, metrics, evaluator = self._evaluate(dataset, vocabulary, seed)
            ref = _pycocotools_split_ap50(path, dets)
            summary = evaluator.last_ovd_summary
            self.assertEqual(summary["vocabulary"], vocabulary)
            for split, total in (("novel", 17), ("base", 48), ("all", 65)):
                value, count = ref[split]
                self.assertGreater(count, 0)
                msg = (dataset, vocabulary, split)
                self.assertAlmostEqual(metrics[f"AP50-{split}"], value, places=6, msg=msg)
                self.assertEqual(metrics[f"AP50-{split}-num_classes"], count)
                excluded = [k for k in metrics if k.startswith(f"AP50-{split}-excluded-")]
                self.assertEqual(len(excluded), total - count)
                self.assertEqual(len(summary[split]["excluded"]), total - count)
                self.assertTrue(all(math.isnan(metrics[k]) for k in excluded))
            self.assertIn("AP50", metrics)
            self.assertTrue(any(k.startswith("AP-") for k in metrics))
        self.assertTrue(os.listdir(self.tmp))

    def test_no_detections_give_zero_ap50(self):
        src, _ = _load("coco128")
        name = f"kd_test_ovd_empty_{uuid.uuid4().hex[:6]}"
        path = register_coco_ovd(name, src, shared_data("coco128", "val2017"), "val", self.tmp)
        self.names.append(name)
        with open(path) as f:
            gt = json.load(f)
        evaluator = COCOOVDEvaluator(name, distributed=False)
        evaluator.reset()
        for image in gt["images"]:
            inst = Instances((image["height"], image["width"]))
            inst.pred_boxes = Boxes(torch.zeros(0, 4))
            inst.scores = torch.zeros(0)
            inst.pred_classes = torch.zeros(0, dtype=torch.long)
            evaluator.process([{"image_id": image["id"]}], [{"instances": inst}])
        metrics = evaluator.evaluate()["bbox"]
        with_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
        for split, ids in (("novel", COCO_OVD_NOVEL_IDS), ("base", COCO_OVD_BASE_IDS)):
            self.assertEqual(metrics[f"AP50-{split}"], 0.0)
            self.assertEqual(metrics[f"AP50-{split}-num_classes"], len(with_gt & set(ids)))
        self.assertEqual(metrics["AP50-all-num_classes"], len(with_gt))
        self.assertEqual(metrics["AP"], 0.0)
