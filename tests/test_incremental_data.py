# Copyright (c) kd_detr contributors.
"""Class-incremental split (DATASETS.INCREMENTAL) and the coco_incremental evaluator against
pycocotools with catIds restricted."""
import contextlib
import io
import json
import os
import random
import tempfile
import unittest

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from kd_detr.config import load_config
from kd_detr.data import base_training_set, few_shot_novel_set
from kd_detr.evaluation import EVALUATOR_REGISTRY


def _records(num=40, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(num):
        anns = [{"category_id": rng.randrange(4), "bbox": [0, 0, 5, 5], "n": j}
                for j in range(rng.randint(1, 3))]  # fmt: skip
        out.append({"image_id": 100 + i, "file_name": f"{i}.jpg", "annotations": anns})
    rng.shuffle(out)  # the draw must not depend on the dicts' order
    return out


class TestSplit(unittest.TestCase):
    def test_base_set_drops_novel_annotations_keeps_base_images(self):
        records = _records()
        base = base_training_set(records, [0, 1])
        with_base = [r for r in records if {a["category_id"] for a in r["annotations"]} & {0, 1}]
        self.assertEqual(sorted(r["image_id"] for r in base),
                         sorted(r["image_id"] for r in with_base))  # fmt: skip
        for kept, source in zip(base, with_base):
            self.assertEqual(kept["image_id"], source["image_id"])
            expected = [a for a in source["annotations"] if a["category_id"] in (0, 1)]
            self.assertEqual(kept["annotations"], expected)
        self.assertTrue(any(len(r["annotations"]) > 0 for r in base))
        self.assertTrue(any(a["category_id"] >= 2 for r in records for a in r["annotations"]))

    def test_few_shot_set(self):
        records = _records()
        shots = few_shot_novel_set(records, [3, 2], 4, seed=5)
        self.assertEqual(len(shots), 8)
        ids = [r["image_id"] for r in shots]
        self.assertEqual(len(set(ids)), 8)  # disjoint over the classes
        by_id = {r["image_id"]: r for r in records}
        for cls in (2, 3):
            drawn = [r for r in shots if r["annotations"][0]["category_id"] == cls]
            self.assertEqual(len(drawn), 4)
            for r in drawn:
                self.assertTrue(all(a["category_id"] == cls for a in r["annotations"]))
                source = by_id[r["image_id"]]["annotations"]
                self.assertEqual(r["annotations"], [a for a in source if a["category_id"] == cls])
        # Deterministic in the seed, independent of the dicts' order; another seed differs.
        again = few_shot_novel_set(list(reversed(records)), [2, 3], 4, seed=5)
        self.assertEqual([r["image_id"] for r in again], ids)
        other = few_shot_novel_set(records, [2, 3], 4, seed=6)
        self.assertNotEqual([r["image_id"] for r in other], ids)

    def test_too_many_shots_names_the_key(self):
        records = _records(num=10)
        available = sum(any(a["category_id"] == 2 for a in r["annotations"]) for r in records)
        with self.assertRaisesRegex(
            ValueError,
            f"SHOTS {available + 1}: novel class 2 \\('c'\\) shows in only {available} .*"
            f"lower DATASETS.INCREMENTAL.SHOTS to at most {available}",
        ):
            few_shot_novel_set(records, [2], available + 1, seed=0, class_names="abcd")

    def test_demo_split(self):
        base = DatasetCatalog.get("kd_demo_incremental_base_train")
        novel = DatasetCatalog.get("kd_demo_incremental_novel_train")
        self.assertFalse([a for r in base for a in r["annotations"] if a["category_id"] == 3])
        self.assertEqual({a["category_id"] for r in base for a in r["annotations"]}, {0, 1, 2})
        self.assertEqual(len(novel), 10)
        self.assertEqual({a["category_id"] for r in novel for a in r["annotations"]}, {3})
        meta = MetadataCatalog.get("kd_demo_incremental_val")
        self.assertEqual((meta.incremental_base_classes, meta.incremental_novel_classes),
                         ([0, 1, 2], [3]))  # fmt: skip
        self.assertEqual(meta.json_file, MetadataCatalog.get("kd_demo_val").json_file)

    def test_bad_config_names_the_key(self):
        cases = {
            ("DATASETS.INCREMENTAL.BASE_CLASSES", "[0, 7]"): "BASE_CLASSES \\[0, 7\\] has ids "
            "\\[7\\] outside \\[0, 3\\]",
            ("DATASETS.INCREMENTAL.BASE_CLASSES", "[0, 1, 2, 3]"): "leave at least one novel",
            ("DATASETS.INCREMENTAL.TRAIN_SOURCE", "nope"): "TRAIN_SOURCE 'nope' is not a reg",
            ("DATASETS.INCREMENTAL.SHOTS", "0"): "SHOTS must be >= 1",
        }
        try:
            for (key, value), message in cases.items():
                with self.subTest(key=key, value=value), self.assertRaisesRegex(
                    ValueError, message
                ):
                    load_config(opts=[key, value, "DATASETS.INCREMENTAL.NAME", "bad_split"])
        finally:
            load_config()  # the demo split as before


def _gt_json(path):
    rng = np.random.RandomState(0)
    cats = [1, 2, 5, 7]
    images, anns = [], []
    for i in range(6):
        images.append({"id": i + 1, "width": 100, "height": 80, "file_name": f"{i}.jpg"})
        for _ in range(rng.randint(1, 5)):
            x, y = rng.uniform(0, 60), rng.uniform(0, 40)
            w, h = rng.uniform(8, 35), rng.uniform(8, 35)
            anns.append({"id": len(anns) + 1, "image_id": i + 1,
                         "category_id": int(rng.choice(cats)), "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})  # fmt: skip
    content = {"images": images, "annotations": anns,
               "categories": [{"id": c, "name": f"c{c}"} for c in cats]}  # fmt: skip
    with open(path, "w") as f:
        json.dump(content, f)
    return content


class TestIncrementalEvaluator(unittest.TestCase):
    def test_against_pycocotools_with_cat_ids(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "gt.json")
        gt = _gt_json(path)
        name = "test_incremental_eval"
        MetadataCatalog.get(name).set(
            json_file=path, thing_classes=["c1", "c2", "c5", "c7"],
            thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 5: 2, 7: 3},
            incremental_base_classes=[0, 1, 3],
        )  # fmt: skip
        self.addCleanup(MetadataCatalog.remove, name)
        evaluator = EVALUATOR_REGISTRY.get("coco_incremental")(name, distributed=False)
        evaluator.reset()
        rng = np.random.RandomState(1)
        dets = []
        for image in gt["images"]:
            gts = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
            boxes, classes = [], []
            for a in gts:  # jittered true boxes, sometimes with the wrong class, plus noise
                boxes.append(np.array(a["bbox"]) + rng.normal(0, 3, 4))
                classes.append({1: 0, 2: 1, 5: 2, 7: 3}[a["category_id"]])
                if rng.rand() < 0.3:
                    classes[-1] = int(rng.randint(4))
            for _ in range(3):
                boxes.append(np.array([*rng.uniform(0, 60, 2), *rng.uniform(5, 30, 2)]))
                classes.append(int(rng.randint(4)))
            xywh = torch.tensor(np.stack(boxes), dtype=torch.float32)
            xywh[:, 2:] = xywh[:, 2:].clamp(min=1)
            xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            inst = Instances((80, 100))
            inst.pred_boxes = Boxes(xyxy)
            inst.scores = torch.tensor(rng.uniform(0.05, 1, len(boxes)), dtype=torch.float32)
            inst.pred_classes = torch.tensor(classes)
            evaluator.process([{"image_id": image["id"]}], [{"instances": inst}])
            for b, s, c in zip(xywh.tolist(), inst.scores.tolist(), classes):
                dets.append({"image_id": image["id"], "category_id": [1, 2, 5, 7][c],
                             "bbox": b, "score": s})  # fmt: skip
        metrics = evaluator.evaluate()["bbox"]
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(path)
            coco_dt = coco.loadRes(dets)
            for group, cat_ids in {"base": [1, 2, 7], "novel": [5], "all": [1, 2, 5, 7]}.items():
                reference = COCOeval(coco, coco_dt, "bbox")
                reference.params.catIds = cat_ids
                reference.evaluate()
                reference.accumulate()
                reference.summarize()
                with self.subTest(group=group):
                    self.assertAlmostEqual(metrics[f"AP-{group}"], 100 * reference.stats[0], 6)
                    self.assertAlmostEqual(metrics[f"AP50-{group}"], 100 * reference.stats[1], 6)
        self.assertAlmostEqual(metrics["AP-all"], metrics["AP"], 6)
        self.assertNotAlmostEqual(metrics["AP-base"], metrics["AP-novel"], 3)

    def test_dataset_without_base_classes(self):
        with self.assertRaisesRegex(ValueError, "needs the base classes.*kd_demo_incremental_val"):
            EVALUATOR_REGISTRY.get("coco_incremental")("kd_demo_val", distributed=False)


if __name__ == "__main__":
    unittest.main()
