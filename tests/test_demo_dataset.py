# Copyright (c) kd_detr contributors.
"""The synthetic demo dataset: determinism, annotations, caching, atomic writes, registration."""
import filecmp
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from kd_detr.config import load_config
from kd_detr.data.datasets import demo
from kd_detr.data.datasets.demo import (
    DEMO_CLASSES,
    DemoSettings,
    demo_dataset_dir,
    demo_root,
    generate_demo_dataset,
    prepare_demo_dataset,
    register_demo_datasets,
)

SMALL = DemoSettings(num_train=24, num_val=6, image_size=96)


def _kd_cfg():
    cfg = load_config(freeze=False, register_datasets=False)
    return cfg


def _load(directory, split):
    with open(os.path.join(directory, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def _all_files(directory):
    return sorted(
        os.path.relpath(os.path.join(root, name), directory)
        for root, _, names in os.walk(directory)
        for name in names
    )


@pytest.fixture
def restore_default_registration():
    yield
    register_demo_datasets()


def test_defaults_match_config():
    assert DemoSettings.from_cfg(_kd_cfg()) == DemoSettings()
    assert MetadataCatalog.get("kd_demo_train").thing_classes == list(DEMO_CLASSES)
    assert 3 <= len(DEMO_CLASSES) <= 5


def test_generation_is_deterministic(tmp_path):
    generate_demo_dataset(str(tmp_path / "a"), SMALL, show_progress=False)
    generate_demo_dataset(str(tmp_path / "b"), SMALL, show_progress=False)
    files = _all_files(str(tmp_path / "a"))
    assert files == _all_files(str(tmp_path / "b"))
    assert len(files) == SMALL.num_train + SMALL.num_val + 3  # images, 2 json, settings.json
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors

    other = DemoSettings(num_train=24, num_val=6, image_size=96, seed=1)
    generate_demo_dataset(str(tmp_path / "c"), other, show_progress=False)
    assert _load(str(tmp_path / "a"), "train") != _load(str(tmp_path / "c"), "train")
    # Train and val come from different random streams.
    assert not filecmp.cmp(tmp_path / "a/train/000000.jpg", tmp_path / "a/val/000000.jpg", False)


def test_annotations_are_valid(tmp_path):
    settings = DemoSettings(num_train=60, num_val=6, image_size=128)
    directory = str(tmp_path / "demo")
    generate_demo_dataset(directory, settings, show_progress=False)
    coco = _load(directory, "train")
    assert [c["name"] for c in coco["categories"]] == list(DEMO_CLASSES)
    assert len(coco["images"]) == 60
    per_image = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann["bbox"])
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert 0.1 * 128 <= max(w, h) <= 0.7 * 128
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4}
    counts = [len(boxes) for boxes in per_image.values()]
    assert min(counts) >= settings.min_objects and max(counts) <= settings.max_objects
    assert np.mean(counts) > 2.0  # placement rarely fails
    for boxes in per_image.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert demo._overlap(a, b) <= 0.3 + 1e-9
    image = Image.open(os.path.join(directory, "train", coco["images"][0]["file_name"]))
    assert image.size == (128, 128) and image.mode == "RGB" and image.format == "JPEG"


def test_default_generation_is_fast(tmp_path):
    start = time.perf_counter()
    directory = prepare_demo_dataset(DemoSettings(), str(tmp_path), show_progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0, f"generating the default demo dataset took {elapsed:.1f} s"
    assert len(_load(directory, "train")["images"]) == 600
    assert len(_load(directory, "val")["images"]) == 100


def test_cache_is_keyed_by_settings_and_reused(tmp_path):
    root = str(tmp_path)
    first = prepare_demo_dataset(SMALL, root, show_progress=False)
    assert first == demo_dataset_dir(SMALL, root) and first.startswith(root)
    mtime = os.path.getmtime(os.path.join(first, "annotations", "instances_train.json"))
    assert prepare_demo_dataset(SMALL, root, show_progress=False) == first
    assert os.path.getmtime(os.path.join(first, "annotations", "instances_train.json")) == mtime
    fewer_objects = DemoSettings(num_train=24, num_val=6, image_size=96, max_objects=2)
    other = prepare_demo_dataset(fewer_objects, root, show_progress=False)
    assert other != first
    assert sorted(os.listdir(root)) == sorted([os.path.basename(first), os.path.basename(other)])


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def crash(rng, settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_render", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo_dataset(SMALL, str(tmp_path), show_progress=False)
    assert os.listdir(tmp_path) == []


def test_concurrent_generation_keeps_the_first_result(tmp_path, monkeypatch):
    root = str(tmp_path)
    final = demo_dataset_dir(SMALL, root)
    original = demo.generate_demo_dataset

    def race(directory, settings, show_progress=True):
        original(final, settings, show_progress=False)  # another process finishes first
        original(directory, settings, show_progress=False)

    monkeypatch.setattr(demo, "generate_demo_dataset", race)
    assert prepare_demo_dataset(SMALL, root, show_progress=False) == final
    assert os.listdir(root) == [os.path.basename(final)]
    assert len(_load(final, "val")["images"]) == SMALL.num_val


def test_root_resolution(tmp_path, monkeypatch):
    cfg = _kd_cfg()
    monkeypatch.delenv("KD_DETR_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_root(cfg) == str(tmp_path / "home" / ".cache" / "kd_detr")
    monkeypatch.setenv("KD_DETR_DATA", str(tmp_path / "env"))
    assert demo_root(cfg) == str(tmp_path / "env")
    cfg.DATASETS.KD_DEMO.ROOT = str(tmp_path / "cfg")
    assert demo_root(cfg) == str(tmp_path / "cfg")


def test_register_from_config(tmp_path, restore_default_registration):
    cfg = _kd_cfg()
    cfg.DATASETS.KD_DEMO.ROOT = str(tmp_path)
    cfg.DATASETS.KD_DEMO.NUM_TRAIN = 10
    cfg.DATASETS.KD_DEMO.NUM_VAL = 3
    cfg.DATASETS.KD_DEMO.IMAGE_SIZE = 64
    directory = register_demo_datasets(cfg)
    assert not os.path.exists(directory)  # generated on first use only
    meta = MetadataCatalog.get("kd_demo_val")
    assert meta.evaluator_type == "coco" and meta.json_file.startswith(str(tmp_path))
    assert meta.thing_classes == list(DEMO_CLASSES)

    dicts = DatasetCatalog.get("kd_demo_val")
    assert len(dicts) == 3 and os.path.isfile(meta.json_file)
    assert all(os.path.isfile(d["file_name"]) and d["height"] == 64 for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(4))
    assert len(DatasetCatalog.get("kd_demo_train")) == 10
