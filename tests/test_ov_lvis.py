# Copyright (c) kd_detr contributors.
"""LVIS v1 open-vocabulary split, cat_info tool and LVIS box AP against lvis-api.

The LVIS-format sets are built from real COCO annotations (../shared/data tiny_coco, coco128):
their classes are mapped onto real LVIS v1 categories (with their real r / c / f labels) and
every image gets negative and not-exhaustive category lists, as LVIS images have.
"""
import contextlib
import copy
import importlib.util
import io
import json
import logging
import math
import os
import unittest
import uuid
import warnings
from collections import defaultdict

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import Boxes, Instances

from kd_detr.config import load_config
from kd_detr.evaluation import build_evaluator
from kd_detr.ov import (
    LVISEvaluator,
    build_lvis_cat_info,
    build_lvis_norare_json,
    evaluate_lvis_boxes,
    load_class_freq_weight,
    register_lvis_ovd,
)
from tests.common import REPO_ROOT, TempDatasetsCase, require_module, shared_data

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
AR_METRICS = ("AR@300", "ARs@300", "ARm@300", "ARl@300")
CROWDED_DETS = 400  # detections on one image, above the 300 limit


def _real_lvis_categories():
    with open(shared_data("clip_text", "lvis_v1_train_cat_info.json")) as f:
        return sorted(json.load(f), key=lambda c: c["id"])


def _build_lvis_set(dataset, seed):
    """An LVIS-format dict from a real COCO val json: COCO classes -> real LVIS categories.

    The i-th annotated COCO class becomes an LVIS category of frequency "rcf"[i % 3]; two more
    categories of each frequency have no annotation. Each image lists negatives (absent classes)
    and not-exhaustive classes (present ones, with some of their annotations removed).

    Returns:
        (lvis dict, the annotations before removal: what the detections are made from).
    """
    with open(shared_data(dataset, "annotations", "instances_val2017.json")) as f:
        coco = json.load(f)
    rng = np.random.RandomState(seed)
    lvis_cats = _real_lvis_categories()
    by_freq = {f: [c for c in lvis_cats if c["frequency"] == f] for f in "rcf"}
    coco_ids = sorted({a["category_id"] for a in coco["annotations"]})
    mapping = {cid: by_freq["rcf"[i % 3]][i // 3]["id"] for i, cid in enumerate(coco_ids)}
    unused = {f: [c["id"] for c in by_freq[f] if c["id"] not in mapping.values()] for f in "rcf"}
    cat_ids = sorted(set(mapping.values()) | {c for f in "rcf" for c in unused[f][:2]})
    full = []
    for ann in coco["annotations"]:
        # LVIS has no crowd regions: lvis-api counts tiny_coco's 5 crowd boxes as objects; so do we
        fields = ("id", "image_id", "bbox", "area", "segmentation", "iscrowd")
        keep = {k: ann[k] for k in fields if k in ann}
        full.append(dict(keep, category_id=mapping[ann["category_id"]]))
    by_image = defaultdict(list)
    for ann in full:
        by_image[ann["image_id"]].append(ann)

    images, removed = [], set()
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        present = sorted({a["category_id"] for a in by_image[im["id"]]})
        negatives = [c for c in cat_ids if c not in present and rng.rand() < 0.4]
        not_exhaustive = [c for c in present if rng.rand() < 0.3]
        for c in not_exhaustive:  # the annotators missed some instances of these classes
            anns = [a for a in by_image[im["id"]] if a["category_id"] == c]
            removed |= {a["id"] for a in anns[1:] if rng.rand() < 0.5}
        images.append(
            {
                "id": im["id"],
                "width": im["width"],
                "height": im["height"],
                "coco_url": f"http://images.cocodataset.org/val2017/{im['file_name']}",
                "neg_category_ids": negatives,
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )
    lvis = {
        "info": {"description": f"LVIS-format test set from {dataset}"},
        "images": images,
        "annotations": [a for a in full if a["id"] not in removed],
        "categories": [copy.deepcopy(c) for c in lvis_cats if c["id"] in cat_ids],
    }
    return lvis, full


def _q(v):
    return round(v * 4) / 4  # quarter pixels: exact in float32


def _detections(lvis, full_annotations, seed):
    """Perturbed ground truth (from all instances, also the unannotated ones) plus false positives
    of random classes (some in the image's negatives, some unverified), and on the image with the
    most objects CROWDED_DETS extra loose copies of its objects. Scores: distinct float32 values.
    """
    rng = np.random.RandomState(seed + 100)
    cat_ids = [c["id"] for c in lvis["categories"]]
    by_image = defaultdict(list)
    for ann in full_annotations:
        by_image[ann["image_id"]].append(ann)
    crowded = max(lvis["images"], key=lambda im: len(by_image[im["id"]]))["id"]
    dets = []
    for image in lvis["images"]:
        W, H = image["width"], image["height"]
        boxes = [(a["category_id"], a["bbox"]) for a in by_image[image["id"]] if rng.rand() > 0.2]
        random_box = [rng.uniform(0, W / 2), rng.uniform(0, H / 2), 60.0, 50.0]
        boxes += [(int(rng.choice(cat_ids)), random_box) for _ in range(rng.poisson(2.0))]
        if image["neg_category_ids"]:
            boxes.append((int(rng.choice(image["neg_category_ids"])), [10.0, 10.0, 80.0, 70.0]))
        if image["id"] == crowded:  # loose copies of its objects: the 300 limit drops some
            anns = by_image[image["id"]]
            for k in rng.randint(len(anns), size=CROWDED_DETS):
                x, y, w, h = anns[k]["bbox"]
                s = rng.uniform(0.7, 1.4)
                boxes.append((anns[k]["category_id"], [x + (1 - s) * w / 2, y, w * s, h]))
        for cat, (x, y, w, h) in boxes:
            x, y = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
            w, h = w * math.exp(rng.normal(0, 0.12)), h * math.exp(rng.normal(0, 0.12))
            x1, y1 = min(max(_q(x), 0.0), W - 2.0), min(max(_q(y), 0.0), H - 2.0)
            x2, y2 = min(max(_q(x + w), x1 + 1.0), W), min(max(_q(y + h), y1 + 1.0), H)
            dets.append(
                {"image_id": image["id"], "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "score": float(np.float32(rng.uniform(0.01, 1.0)))}
            )  # fmt: skip
    return dets


@contextlib.contextmanager
def _numpy_float_alias():
    """lvis-api uses ``np.float``, removed in numpy 1.24: alias it while lvis-api runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        had = "float" in np.__dict__
        if not had:
            np.float = float
        try:
            yield
        finally:
            if not had:
                del np.float


def _lvis_api(gt_path, dets, max_dets=300):
    """lvis-api's box results (fractions)."""
    require_module("lvis")
    require_module("pycocotools")
    from lvis import LVIS, LVISEval, LVISResults

    with _numpy_float_alias(), contextlib.redirect_stdout(io.StringIO()):
        logging.getLogger("lvis").setLevel(logging.ERROR)
        gt = LVIS(gt_path)
        ev = LVISEval(gt, LVISResults(gt, copy.deepcopy(dets), max_dets=max_dets), "bbox")
        ev.params.max_dets = max_dets
        ev.run()
    return dict(ev.get_results())


class _TmpDirCase(TempDatasetsCase):
    tmp_prefix = "kd_ov_lvis_"

    def setUp(self):
        torch.set_num_threads(1)
        super().setUp()

    def _write(self, obj, stem):
        path = os.path.join(self.tmp, f"{stem}.json")
        with open(path, "w") as f:
            json.dump(obj, f)
        return path

    def _register(self, path, split, lvis, dataset="tiny_coco"):
        name = f"kd_test_lvis_{split}_{uuid.uuid4().hex[:6]}"
        names = [c["name"] for c in sorted(lvis["categories"], key=lambda c: c["id"])]
        register_lvis_ovd(name, path, shared_data(dataset), split=split, thing_classes=names)
        self.names.append(name)
        return name


class TestLvisEvaluation(_TmpDirCase):
    def _assert_matches(self, ours, ref, msg):
        for key in METRICS + AR_METRICS:
            self.assertLessEqual(abs(ours[key] - ref[key]), 1e-6, f"{msg}: {key}")

    def test_metrics_match_lvis_api(self):
        for seed, dataset in enumerate(("tiny_coco", "coco128")):
            lvis, full = _build_lvis_set(dataset, seed)
            path = self._write(lvis, dataset)
            dets = _detections(lvis, full, seed)
            ref = _lvis_api(path, dets)
            ours = evaluate_lvis_boxes(path, dets)
            self._assert_matches(ours.stats, ref, dataset)
            for f in "rcf":  # every frequency group has classes with and without ground truth
                with_gt = ours.classes_with_gt(f)
                listed = [c["id"] for c in lvis["categories"] if c["frequency"] == f]
                self.assertTrue(0 < len(with_gt) < len(listed), (dataset, f))
                annotated = {a["category_id"] for a in lvis["annotations"]}
                self.assertEqual(set(with_gt), annotated & set(listed))
            if dataset != "tiny_coco":
                continue
            # Each LVIS rule changes the numbers on this set, and we still match lvis-api:
            # negatives (their detections count as false positives), not-exhaustive classes
            # (unmatched detections ignored) and the 300-detection limit.
            self.assertTrue(any(len(im["neg_category_ids"]) for im in lvis["images"]))
            variants = {}
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                changed = copy.deepcopy(lvis)
                for im in changed["images"]:
                    im[key] = []
                variants[key] = (self._write(changed, key), 300)
            variants["max_dets"] = (path, 1000)
            for what, (gt_path, max_dets) in variants.items():
                ref_v = _lvis_api(gt_path, dets, max_dets=max_dets)
                ours_v = evaluate_lvis_boxes(gt_path, dets, max_dets=max_dets)
                ours_v.stats.update({k.replace("1000", "300"): v for k, v in ours_v.stats.items()})
                ref_v.update({k.replace("1000", "300"): v for k, v in ref_v.items()})
                self._assert_matches(ours_v.stats, ref_v, what)
                self.assertGreater(abs(ours_v.stats["AP"] - ours.stats["AP"]), 1e-4, what)

    def test_evaluator_on_instances(self):
        lvis, full = _build_lvis_set("tiny_coco", 0)
        path = self._write(lvis, "val")
        name = self._register(path, "val", lvis)
        dets = _detections(lvis, full, 0)
        ref = _lvis_api(path, dets)

        cfg = load_config(freeze=False, register_datasets=False)
        cfg.TEST.EVALUATOR = "lvis"
        out_dir = os.path.join(self.tmp, "inference")
        evaluator = build_evaluator(cfg, name, out_dir)
        self.assertIsInstance(evaluator, LVISEvaluator)
        contiguous = {c["id"]: i for i, c in enumerate(lvis["categories"])}
        by_image = defaultdict(list)
        for d in dets:
            by_image[d["image_id"]].append(d)
        evaluator.reset()
        for image in lvis["images"]:
            ds = by_image[image["id"]]
            inst = Instances((image["height"], image["width"]))
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ds)]
            inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([d["score"] for d in ds], dtype=torch.float32)
            inst.pred_classes = torch.tensor([contiguous[d["category_id"]] for d in ds]).long()
            evaluator.process([{"image_id": image["id"]}], [{"instances": inst}])
        kept = max(len(p["instances"]) for p in evaluator._predictions)
        self.assertEqual(kept, 300)  # the crowded image keeps its top 300 only
        metrics = evaluator.evaluate()["bbox"]
        for key in METRICS + AR_METRICS:
            self.assertAlmostEqual(metrics[key], 100.0 * ref[key], delta=1e-4, msg=key)
        summary = evaluator.last_lvis_summary
        annotated = {a["category_id"] for a in lvis["annotations"]}
        for f in "rcf":
            cats = [c for c in lvis["categories"] if c["frequency"] == f]
            with_gt = [c["name"] for c in cats if c["id"] in annotated]
            self.assertEqual(summary[f]["classes"], with_gt)
            without_gt = [c["name"] for c in cats if c["id"] not in annotated]
            self.assertEqual(summary[f]["excluded"], without_gt)
            self.assertEqual(metrics[f"AP{f}-num_classes"], len(summary[f]["classes"]))
        with open(os.path.join(out_dir, "lvis_instances_results.json")) as f:
            saved = json.load(f)
        self.assertEqual(len(saved), sum(min(len(v), 300) for v in by_image.values()))
        self.assertEqual({d["category_id"] for d in saved}, {d["category_id"] for d in dets})

    def test_bad_inputs(self):
        coco_path = shared_data("tiny_coco", "annotations", "instances_val2017.json")
        with self.assertRaisesRegex(ValueError, "frequency.*TEST.EVALUATOR coco"):
            evaluate_lvis_boxes(coco_path, [])
        lvis, full = _build_lvis_set("tiny_coco", 0)
        no_lists = copy.deepcopy(lvis)
        del no_lists["images"][3]["neg_category_ids"]
        with self.assertRaisesRegex(ValueError, "neg_category_ids"):
            evaluate_lvis_boxes(no_lists, [])
        det = {"image_id": lvis["images"][0]["id"], "bbox": [1, 2, 3, 4], "score": 0.5}
        with self.assertRaisesRegex(ValueError, "not in the ground truth"):
            evaluate_lvis_boxes(lvis, [dict(det, category_id=99999)])
        self.assertTrue(math.isnan(evaluate_lvis_boxes(lvis, []).stats["APr"]))
        train = self._register(self._write(lvis, "train"), "train", lvis)
        with self.assertRaisesRegex(ValueError, "json_file.*split='val'"):
            LVISEvaluator(train, distributed=False)


class TestLvisNorareSplit(_TmpDirCase):
    def test_norare_json(self):
        lvis, _ = _build_lvis_set("tiny_coco", 0)
        source = copy.deepcopy(lvis)
        rare = {c["id"] for c in lvis["categories"] if c["frequency"] == "r"}
        out = build_lvis_norare_json(lvis)
        self.assertEqual(lvis, source)  # the input is left untouched
        self.assertFalse(any(a["category_id"] in rare for a in out["annotations"]))
        expected = [a for a in source["annotations"] if a["category_id"] not in rare]
        self.assertGreater(len(source["annotations"]), len(expected))  # rare ones existed
        self.assertEqual(out["annotations"], expected)  # the others: same, same order
        self.assertEqual(out["categories"], source["categories"])  # the full vocabulary
        self.assertEqual([im["id"] for im in out["images"]], [im["id"] for im in lvis["images"]])
        for before, after in zip(source["images"], out["images"]):
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                self.assertEqual(after[key], [c for c in before[key] if c not in rare])
        self.assertEqual(out["info"]["lvis_ovd"]["removed_frequencies"], ["r"])
        bad = copy.deepcopy(lvis)
        del bad["categories"][0]["frequency"]
        with self.assertRaisesRegex(ValueError, "frequency"):
            build_lvis_norare_json(bad)

    def test_registered_train_split(self):
        lvis, _ = _build_lvis_set("tiny_coco", 0)
        name = self._register(self._write(lvis, "train"), "train", lvis)
        rare = {c["id"] for c in lvis["categories"] if c["frequency"] == "r"}
        cat_ids = sorted(c["id"] for c in lvis["categories"])
        kept = defaultdict(list)
        for a in lvis["annotations"]:
            if a["category_id"] not in rare:
                kept[a["image_id"]].append(a)
        num_with_base = len(kept)
        dicts = DatasetCatalog.get(name)
        self.assertEqual([d["image_id"] for d in dicts], [im["id"] for im in lvis["images"]])
        for d in dicts:
            self.assertTrue(os.path.isfile(d["file_name"]), d["file_name"])
            got = [(cat_ids[o["category_id"]], o["bbox"]) for o in d["annotations"]]
            self.assertEqual(got, [(a["category_id"], a["bbox"]) for a in kept[d["image_id"]]])
        meta = MetadataCatalog.get(name)
        self.assertEqual(len(meta.thing_classes), len(cat_ids))
        self.assertIsNone(meta.get("json_file", None))
        # Images left without annotations follow DATALOADER.FILTER_EMPTY_ANNOTATIONS.
        filtered = get_detection_dataset_dicts([name], filter_empty=True)
        self.assertEqual(len(filtered), num_with_base)
        self.assertLess(len(filtered), len(lvis["images"]))
        self.assertEqual(len(get_detection_dataset_dicts([name], filter_empty=False)), len(dicts))

        wrong = f"{name}_wrong"
        register_lvis_ovd(wrong, self._write(lvis, "wrong"), shared_data("tiny_coco"))
        self.names.append(wrong)
        with self.assertRaisesRegex(ValueError, "1203 thing_classes"):
            DatasetCatalog.get(wrong)

    def test_builtin_split_and_config(self):
        meta = MetadataCatalog.get("lvis_v1_train_norare")
        self.assertIn("lvis_v1_train_norare", DatasetCatalog.list())
        self.assertEqual(len(meta.thing_classes), 1203)
        self.assertEqual(meta.thing_classes, MetadataCatalog.get("lvis_v1_val").thing_classes)
        self.assertTrue(meta.lvis_json_file.endswith(os.path.join("lvis", "lvis_v1_train.json")))
        self.assertEqual(meta.lvis_removed_frequencies, ["r"])
        config_file = os.path.join(REPO_ROOT, "configs", "ov", "Base-LVIS-OVD.yaml")
        cfg = load_config(config_file, freeze=False, register_datasets=False)
        self.assertEqual(cfg.DATASETS.TRAIN, ("lvis_v1_train_norare",))
        self.assertEqual(cfg.TEST.EVALUATOR, "lvis")
        self.assertEqual(cfg.TEST.DETECTIONS_PER_IMAGE, 300)


class TestLvisCatInfo(_TmpDirCase):
    def _tool(self, *argv):
        path = os.path.join(REPO_ROOT, "tools", "lvis_cat_info.py")  # tools/ is not a package
        spec = importlib.util.spec_from_file_location("kd_detr_lvis_cat_info", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main(list(argv))

    def test_counts_match_independent_count(self):
        lvis, _ = _build_lvis_set("coco128", 1)
        src = self._write(lvis, "train")
        images, instances = defaultdict(set), defaultdict(int)
        for a in lvis["annotations"]:
            images[a["category_id"]].add(a["image_id"])
            instances[a["category_id"]] += 1
        frequency = {c["id"]: c["frequency"] for c in lvis["categories"]}
        detic_keys = set(_real_lvis_categories()[0])

        out = self._tool(src, os.path.join(self.tmp, "out", "cat_info.json"))
        kept = self._tool("--keep-rare", src, os.path.join(self.tmp, "cat_info_all.json"))
        with open(out) as f:
            zeroed = json.load(f)
        with open(kept) as f:
            full = json.load(f)
        self.assertEqual([c["id"] for c in zeroed], sorted(frequency))
        for z, k in zip(zeroed, full):
            self.assertEqual(set(z), detic_keys)  # Detic's cat_info schema
            cid = z["id"]
            self.assertEqual((k["image_count"], k["instance_count"]),
                             (len(images[cid]), instances[cid]))  # fmt: skip
            rare = frequency[cid] == "r"
            self.assertEqual(z["image_count"], 0 if rare else len(images[cid]))
            self.assertEqual(z["instance_count"], 0 if rare else instances[cid])
        self.assertTrue(any(c["image_count"] for c in full if c["frequency"] == "r"))
        # Zeroing the rare counts = counting on the open-vocabulary training split.
        self.assertEqual(build_lvis_cat_info(build_lvis_norare_json(lvis), ()), zeroed)
        weights = load_class_freq_weight(out, zero_rare=False)
        expected = [0.0 if frequency[c] == "r" else len(images[c]) ** 0.5 for c in frequency]
        torch.testing.assert_close(weights, torch.tensor(expected))
        with self.assertRaises(SystemExit):
            self._tool(os.path.join(self.tmp, "missing.json"), out)


if __name__ == "__main__":
    unittest.main()
