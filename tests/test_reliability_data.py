# Copyright (c) kd_detr contributors.
"""Reliability of what runs read: unreadable / missing / mis-sized images, dataset and evaluator
names checked before training, COCO-json classes known at registration (class checks, KD class
lists), broken annotations and text embeddings named clearly."""
import importlib.util
import json
import logging
import os
import tempfile
import time
import unittest

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog

from kd_detr.config import load_config
from kd_detr.data import (
    BadImagePolicy,
    check_image_files,
    register_coco_json,
    register_from_config,
)
from kd_detr.engine import KDTrainer, preflight_check
from kd_detr.modeling.num_classes import check_num_classes
from kd_detr.ov import load_text_embeddings

from .common import REPO_ROOT, TempDatasetsCase, require_module
from .kd_helpers import TINY_OPTS, kd_cfg, save_teacher
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

DEMO = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite0_demo.yaml")
OV_CONFIG = os.path.join(REPO_ROOT, "configs", "ov", "ov_dab_detr_efflite0_coco128_ovd.yaml")


def _load_tool(name):
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kd_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_coco(folder, classes, boxes=((0, [4, 4, 20, 20]),), num_images=2, size=48):
    """A COCO json over ``num_images`` real images; ``boxes`` (class index, xywh) per image."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(1, num_images + 1):
        name = f"{i}.jpg"
        Image.new("RGB", (size, size), (i * 40, 90, 160)).save(os.path.join(folder, "images", name))
        images.append({"id": i, "file_name": name, "width": size, "height": size})
        for c, box in boxes:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i, "category_id": c + 1, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )  # fmt: skip
    content = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": n} for c, n in enumerate(classes)],
    }
    path = os.path.join(folder, "instances.json")
    with open(path, "w") as f:
        json.dump(content, f)
    return path, os.path.join(folder, "images")


class CaptureWarnings:
    """Collect the WARNING records of a logger."""

    def __init__(self, name):
        self.logger, self.records = logging.getLogger(name), []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self.records.append

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    def text(self):
        return "\n".join(r.getMessage() for r in self.records)


class TestBadImages(TempDatasetsCase):
    def test_truncated_image_is_named_or_skipped_with_a_count(self):
        json_file, root = write_coco(self.tmp, ["cat"])
        with open(os.path.join(root, "2.jpg"), "r+b") as f:
            f.truncate(100)  # a download that stopped half-way
        self.register("t_bad_img", json_file, root)
        cfg = load_config(DEMO, ["DATASETS.TRAIN", "('t_bad_img',)"], freeze=False)
        records = DatasetCatalog.get("t_bad_img")
        policy = BadImagePolicy(DatasetMapper(cfg, is_train=True), "error")
        self.assertIn("instances", policy(records[0]))
        with self.assertRaisesRegex(RuntimeError, "2.jpg.*DATALOADER.ON_BAD_IMAGE skip"):
            policy(records[1])
        skip = BadImagePolicy(DatasetMapper(cfg, is_train=True), "skip")
        with CaptureWarnings("kd_detr.data.bad_images") as logs:
            self.assertIsNone(skip(records[1]))
            self.assertIsNone(skip(records[1]))
        self.assertIn("2.jpg", logs.text())
        self.assertIn("2 image(s) skipped so far", logs.text())
        test_policy = BadImagePolicy(DatasetMapper(cfg, is_train=False), "skip", is_train=False)
        with self.assertRaisesRegex(RuntimeError, "Cannot read image .*2.jpg"):
            test_policy(records[1])  # evaluation would silently miss the image

    def test_preflight_names_missing_and_mis_sized_images(self):
        json_file, root = write_coco(self.tmp, ["cat"], num_images=3)
        os.remove(os.path.join(root, "1.jpg"))
        Image.new("RGB", (30, 20)).save(os.path.join(root, "3.jpg"))
        self.register("t_files", json_file, root)
        problems = check_image_files(DatasetCatalog.get("t_files"))
        self.assertEqual(len(problems.missing), 1)
        self.assertIn("3.jpg (file 30x20, dataset 48x48)", problems.size_mismatch[0])
        opts = ["DATASETS.TRAIN", "('t_files',)", "DATASETS.TEST", "()", "MODEL.DETR.NUM_CLASSES",
                "1", "OUTPUT_DIR", os.path.join(self.tmp, "out")]  # fmt: skip
        with self.assertRaisesRegex(ValueError, "(?s)1 image\\(s\\) missing.*1.jpg.*another width"):
            preflight_check(load_config(DEMO, opts))
        with CaptureWarnings("kd_detr.engine.preflight") as logs:
            preflight_check(load_config(DEMO, opts + ["DATALOADER.ON_BAD_IMAGE", "skip"]))
        self.assertIn("training skips them", logs.text())

    def register(self, name, json_file, root):
        self.names.append(name)
        register_coco_json(name, json_file, root)


class TestNamesBeforeTraining(unittest.TestCase):
    def test_typos_in_evaluator_and_dataset_names(self):
        with tempfile.TemporaryDirectory() as tmp:
            base = ["OUTPUT_DIR", tmp, "DATALOADER.CHECK_IMAGES", "False"]
            with self.assertRaisesRegex(ValueError, "TEST.EVALUATOR 'cocoo'.*Did you mean 'coco'"):
                preflight_check(load_config(DEMO, base + ["TEST.EVALUATOR", "cocoo"]))
            bad = base + ["DATASETS.TEST", "('kd_demo_vall',)"]
            with self.assertRaisesRegex(ValueError, "'kd_demo_vall'.*Did you mean 'kd_demo_val'"):
                preflight_check(load_config(DEMO, bad))


class TestCocoJsonClasses(TempDatasetsCase):
    def setUp(self):
        super().setUp()
        json_file, root = write_coco(self.tmp, ["person", "bicycle", "car", "motorcycle"])
        self.entry = f"t_people,{json_file},{root}"

    def test_classes_are_known_at_registration(self):
        self.names.append("t_people")
        cfg = load_config(DEMO, ["DATASETS.COCO_JSON", f"['{self.entry}']",
                                 "DATASETS.TRAIN", "('t_people',)", "MODEL.DETR.NUM_CLASSES", "3"])
        classes = MetadataCatalog.get("t_people").thing_classes
        self.assertEqual(classes, ["person", "bicycle", "car", "motorcycle"])
        with self.assertRaisesRegex(ValueError, "NUM_CLASSES is 3 but dataset 't_people' has 4"):
            check_num_classes(cfg)

    def test_eval_on_a_dataset_of_other_classes_stops(self):
        json_file, root = write_coco(os.path.join(self.tmp, "three"), ["a", "b", "c"])
        self.names.append("t_three")
        opts = ["DATASETS.COCO_JSON", f"['t_three,{json_file},{root}']", "DATASETS.TEST",
                "('t_three',)"]  # fmt: skip
        cfg = load_config(DEMO, opts)
        check_num_classes(cfg)  # the training data (kd_demo_train) fits
        with self.assertRaisesRegex(ValueError, "NUM_CLASSES is 4 but dataset 't_three' has 3"):
            check_num_classes(cfg, test=True)
        ov = load_config(DEMO, opts + ["MODEL.OV.TEXT_EMBEDDINGS", "vocabulary.npy"])
        check_num_classes(ov, test=True)  # an open vocabulary may test on other classes

    def test_kd_teacher_with_other_classes_is_an_error_naming_both(self):
        self.names.append("t_people")
        teacher = save_teacher(self.tmp)
        cfg = kd_cfg(self.tmp, teacher)
        cfg.defrost()
        cfg.merge_from_list(["DATASETS.COCO_JSON", f"['{self.entry}']",
                             "DATASETS.TRAIN", "('t_people',)"])  # fmt: skip
        cfg.MODEL.KD.TEACHER.OPTS = TINY_OPTS + ["DATASETS.TRAIN", "('kd_demo_train',)"]
        register_from_config(cfg)
        message = "classes differ.*Student classes: \\[person, bicycle, car, motorcycle\\]; teacher"
        with self.assertRaisesRegex(ValueError, message + " classes: \\[circle, square"):
            KDTrainer(cfg)
        # The teacher's own class-count error says it comes from the teacher's config.
        cfg.DATASETS.TRAIN = ("kd_demo_train",)
        cfg.MODEL.KD.TEACHER.OPTS = TINY_OPTS + ["DATASETS.TRAIN", "('kd_demo_train',)",
                                                 "MODEL.DETR.NUM_CLASSES", "5"]  # fmt: skip
        message = "teacher from its config.*CONFIG_FILE.*NUM_CLASSES is 5"
        with self.assertRaisesRegex(ValueError, message):
            KDTrainer(cfg)

    def test_class_mapping_star_with_a_coco_json_student(self):
        json_file, root = write_coco(os.path.join(self.tmp, "s"), ["square", "circle"])
        self.names.append("t_shapes")
        teacher = save_teacher(self.tmp)
        cfg = kd_cfg(os.path.join(self.tmp, "out"), teacher)
        cfg.defrost()
        cfg.merge_from_list([
            "DATASETS.COCO_JSON", f"['t_shapes,{json_file},{root}']", "DATASETS.TRAIN",
            "('t_shapes',)", "MODEL.DETR.NUM_CLASSES", "2", "MODEL.KD.CLASS_MAPPING", "['*']",
        ])  # fmt: skip
        cfg.MODEL.KD.TEACHER.OPTS = TINY_OPTS + ["DATASETS.TRAIN", "('kd_demo_train',)"]
        register_from_config(cfg)
        cfg.freeze()
        trainer = KDTrainer(cfg)
        self.assertEqual(trainer.teacher.class_index, [1, 0])  # square, circle in the teacher


class TestBrokenAnnotations(TempDatasetsCase):
    def test_unknown_category_nan_and_outside_boxes(self):
        json_file, root = write_coco(
            self.tmp, ["cat"],
            boxes=((0, [4, 4, 20, 20]), (0, [float("nan"), 4, 5, 5]), (0, [40, 40, 20, 20])),
        )  # fmt: skip
        self.names.append("t_boxes")
        register_coco_json("t_boxes", json_file, root)
        with CaptureWarnings("kd_detr.data.datasets.coco_json") as logs:
            records = DatasetCatalog.get("t_boxes")
        self.assertEqual([len(r["annotations"]) for r in records], [2, 2])
        self.assertIn("dropped 2 annotation(s) whose box has a NaN", logs.text())
        self.assertIn("2 box(es) extend beyond their image", logs.text())
        with open(json_file) as f:
            content = json.load(f)
        content["annotations"][0]["category_id"] = 9
        with open(json_file, "w") as f:
            json.dump(content, f)
        self.names.append("t_unknown_cat")
        register_coco_json("t_unknown_cat", json_file, root)
        message = "instances.json: 1 annotation.*annotation 1 \\(category_id 9\\)"
        with self.assertRaisesRegex(ValueError, message):
            DatasetCatalog.get("t_unknown_cat")


class TestOVDemoWithoutWeights(unittest.TestCase):
    def test_missing_clip_weights_fail_at_once_naming_text_embeddings(self):
        demo = _load_tool("ov_demo")
        if not demo._hub_unreachable():
            self.skipTest("the Hugging Face hub is reachable here: the weights could download")
        require_module("open_clip")
        with tempfile.TemporaryDirectory() as tmp:
            args = demo.parse_args(["--config-file", OV_CONFIG, "--weights", "w.pth", "--input",
                                    "x.jpg", "--vocabulary", "cat,dog", "--output", tmp])
            start = time.perf_counter()
            with self.assertRaisesRegex(SystemExit, "not cached here.*--text-embeddings"):
                demo.resolve_vocabulary(args)
            self.assertLess(time.perf_counter() - start, 20.0)


class TestTextEmbeddingErrors(unittest.TestCase):
    def test_nan_rows_and_non_arrays(self):
        with tempfile.TemporaryDirectory() as tmp:
            emb = np.ones((4, 8), np.float32)
            emb[2, 3] = np.nan
            path = os.path.join(tmp, "nan.npy")
            np.save(path, emb)
            with self.assertRaisesRegex(ValueError, "NaN or infinite values in rows \\[2\\]"):
                load_text_embeddings(path)
            objects = os.path.join(tmp, "objects.npy")
            np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            with self.assertRaisesRegex(ValueError, "not a numeric array"):
                load_text_embeddings(objects)
