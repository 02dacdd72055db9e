# Copyright (c) kd_detr contributors.
"""COCO-json and Pascal-VOC registration, crowd and empty-image handling, config registration."""
import json
import logging
import os
import shutil

import pytest
from PIL import Image

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.datasets.coco import convert_to_coco_dict

import kd_detr.data
from kd_detr.config import load_config
from kd_detr.data.datasets import (
    load_voc_instances,
    register_coco_json,
    register_from_config,
    register_voc,
)
from tests.common import shared_data

BCCD_CLASSES = ["RBC", "WBC", "Platelets"]
W, H = 64, 48
CROWD_BOX = [2, 2, 30, 30]


@pytest.fixture
def names():
    """Dataset names a test registers; removed from both catalogs afterwards."""
    registered = []
    yield registered
    for name in registered:
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)


def _image(path, size=(W, H)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def _coco(tmp_path, drop_key=None):
    """A COCO json over 4 images: normal + crowd boxes, 2 degenerate boxes, no boxes, crowd only."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in (1, 2, 3, 4)]
    for image in images:
        _image(str(tmp_path / "images" / image["file_name"]))
    boxes = [
        (1, 1, [10, 10, 20, 15], 0),
        (1, 2, [30, 5, 25, 30], 0),
        (1, 3, CROWD_BOX, 1),
        (2, 2, [5, 5, 10, 10], 0),
        (2, 1, [20, 20, 0, 10], 0),  # zero width
        (2, 1, [20, 20, 10, -1], 0),  # negative height
        (4, 3, CROWD_BOX, 1),
    ]
    content = {
        "images": images,
        "annotations": [
            {
                "id": k + 1,
                "image_id": i,
                "category_id": c,
                "bbox": b,
                "iscrowd": crowd,
                "area": max(b[2], 0) * max(b[3], 0),
            }
            for k, (i, c, b, crowd) in enumerate(boxes)
        ],
        "categories": [{"id": i, "name": n} for i, n in [(1, "cat"), (2, "dog"), (3, "crowd")]],
    }
    if drop_key:
        del content[drop_key]
    json_file = str(tmp_path / "instances.json")
    with open(json_file, "w") as f:
        json.dump(content, f)
    return json_file, str(tmp_path / "images")


def _voc(tmp_path, objects_per_image, with_size=True):
    """A Pascal-VOC folder; ``objects_per_image`` maps an id to (name, difficult, box) tuples."""
    root = tmp_path / "voc"
    os.makedirs(root / "Annotations")
    os.makedirs(root / "ImageSets" / "Main")
    for file_id, objects in objects_per_image.items():
        _image(str(root / "JPEGImages" / f"{file_id}.jpg"))
        size = f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>"
        xml = f"<annotation><filename>{file_id}.jpg</filename>{size if with_size else ''}"
        for name, difficult, (x0, y0, x1, y1) in objects:
            xml += (
                f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
                f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                "</bndbox></object>"
            )
        (root / "Annotations" / f"{file_id}.xml").write_text(xml + "</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(objects_per_image) + "\n")
    return str(root)


def _train_cfg(name, filter_empty):
    cfg = load_config(freeze=False, register_datasets=False)
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = filter_empty
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


def test_package_exports():
    assert kd_detr.data.register_coco_json is register_coco_json
    assert "kd_demo_train" in DatasetCatalog.list() and "kd_demo_val" in DatasetCatalog.list()


# ---------------------------------------------------------------- COCO json


def test_coco_json_drops_degenerate_boxes_and_keeps_crowd(tmp_path, names, caplog):
    json_file, image_root = _coco(tmp_path)
    names.append("t_coco")
    register_coco_json("t_coco", json_file, image_root)
    meta = MetadataCatalog.get("t_coco")
    assert meta.evaluator_type == "coco" and meta.json_file == json_file
    with caplog.at_level(logging.WARNING, logger="kd_detr.data.datasets.coco_json"):
        dicts = DatasetCatalog.get("t_coco")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("kd_detr")]
    assert len(warnings) == 1 and json_file in warnings[0] and "dropped 2 " in warnings[0]
    assert [len(d["annotations"]) for d in dicts] == [3, 1, 0, 1]
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for d in dicts for a in d["annotations"])
    assert [a["iscrowd"] for a in dicts[0]["annotations"]] == [0, 0, 1]
    assert MetadataCatalog.get("t_coco").thing_classes == ["cat", "dog", "crowd"]


def test_coco_json_registration_is_idempotent(tmp_path, names):
    json_file, image_root = _coco(tmp_path)
    names.append("t_coco_twice")
    register_coco_json("t_coco_twice", json_file, image_root)
    register_coco_json("t_coco_twice", json_file, image_root)  # identical: no-op
    other = str(tmp_path / "other.json")
    shutil.copy(json_file, other)
    with pytest.raises(ValueError, match="already registered"):
        register_coco_json("t_coco_twice", other, image_root)


def test_coco_json_missing_files(tmp_path):
    json_file, image_root = _coco(tmp_path)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_coco_json("t_missing", missing, image_root)
    with pytest.raises(FileNotFoundError, match="no_images"):
        register_coco_json("t_missing", json_file, str(tmp_path / "no_images"))
    assert "t_missing" not in DatasetCatalog.list()


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_coco_json_missing_key(tmp_path, names, key):
    json_file, image_root = _coco(tmp_path, drop_key=key)
    names.append(f"t_no_{key}")
    with pytest.raises(ValueError, match=f"lacks the key\\(s\\) '{key}'"):
        # the categories are read at registration, the rest when the dataset is loaded
        register_coco_json(f"t_no_{key}", json_file, image_root)
        DatasetCatalog.get(f"t_no_{key}")


def test_coco_json_invalid_json(tmp_path, names):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    names.append("t_bad_json")
    with pytest.raises(ValueError, match="bad.json is not valid json"):
        register_coco_json("t_bad_json", str(bad), str(tmp_path))  # read its categories


def test_dataset_mapper_excludes_crowd_boxes(tmp_path, names):
    json_file, image_root = _coco(tmp_path)
    names.append("t_crowd")
    register_coco_json("t_crowd", json_file, image_root)
    record = DatasetCatalog.get("t_crowd")[0]
    assert any(a["iscrowd"] for a in record["annotations"])
    mapper = DatasetMapper(_train_cfg("t_crowd", True), is_train=True)
    instances = mapper(record)["instances"]
    assert len(instances) == 2 and 2 not in instances.gt_classes.tolist()  # 2: "crowd"
    x, y, w, h = CROWD_BOX
    crowd_xyxy = [x, y, x + w, y + h]
    assert crowd_xyxy not in instances.gt_boxes.tensor.tolist()


def test_dataset_mapper_excludes_crowd_boxes_real_coco(names):
    root = shared_data("tiny_coco")
    names.append("t_tiny_coco_val")
    register_coco_json(
        "t_tiny_coco_val",
        os.path.join(root, "annotations", "instances_val2017.json"),
        os.path.join(root, "val2017"),
    )
    dicts = DatasetCatalog.get("t_tiny_coco_val")
    with_crowd = [d for d in dicts if any(a["iscrowd"] for a in d["annotations"])]
    assert len(dicts) == 50 and with_crowd
    mapper = DatasetMapper(_train_cfg("t_tiny_coco_val", True), is_train=True)
    for record in with_crowd[:2]:
        instances = mapper(dict(record))["instances"]
        assert len(instances) == sum(1 for a in record["annotations"] if not a["iscrowd"])


def test_filter_empty_annotations_both_ways(tmp_path, names):
    json_file, image_root = _coco(tmp_path)
    names.append("t_empty")
    register_coco_json("t_empty", json_file, image_root)
    # Image 3 has no annotation and image 4 only a crowd one: both go when filtering.
    kept = get_detection_dataset_dicts(["t_empty"], filter_empty=True)
    assert [d["image_id"] for d in kept] == [1, 2]
    assert len(get_detection_dataset_dicts(["t_empty"], filter_empty=False)) == 4
    for filter_empty in (True, False):
        loader = build_detection_train_loader(_train_cfg("t_empty", filter_empty))
        batch = next(iter(loader))
        assert len(batch) == 2 and all(b["image"].shape[1:] == (H, W) for b in batch)


def test_filter_empty_annotations_real_coco(names):
    root = shared_data("tiny_coco")
    json_file = os.path.join(root, "annotations", "instances_val2017.json")
    names.append("t_tiny_coco_empty")
    register_coco_json("t_tiny_coco_empty", json_file, os.path.join(root, "val2017"))
    with open(json_file) as f:
        anns = json.load(f)["annotations"]
    expected = len({a["image_id"] for a in anns if not a.get("iscrowd", 0)})
    assert expected < 50  # tiny_coco val has images without annotations
    assert len(get_detection_dataset_dicts(["t_tiny_coco_empty"], filter_empty=True)) == expected
    assert len(get_detection_dataset_dicts(["t_tiny_coco_empty"], filter_empty=False)) == 50


# ---------------------------------------------------------------- Pascal VOC


def test_voc_bccd(caplog, names):
    root = shared_data("bccd")
    with caplog.at_level(logging.WARNING, logger="kd_detr.data.datasets.pascal_voc"):
        dicts = load_voc_instances(root, "trainval", BCCD_CLASSES)
    warnings = sorted(r.getMessage() for r in caplog.records if r.name.startswith("kd_detr"))
    assert len(warnings) == 2
    for warning, file_id in zip(warnings, ["BloodImage_00338", "BloodImage_00343"]):
        xml = os.path.join(root, "Annotations", file_id + ".xml")
        assert warning.startswith(f"{xml}: dropped 1 box(es) with zero or negative area")

    with open(os.path.join(root, "ImageSets", "Main", "trainval.txt")) as f:
        file_ids = f.read().split()
    num_objects = 0
    for file_id in file_ids:
        with open(os.path.join(root, "Annotations", file_id + ".xml")) as f:
            num_objects += f.read().count("<object>")
    assert len(dicts) == len(file_ids) == 292
    assert sum(len(d["annotations"]) for d in dicts) == num_objects - 2
    for d in dicts:
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert x1 > x0 and y1 > y0 and x0 >= 0 and y0 >= 0 and x1 <= d["width"]
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == {0, 1, 2}
    by_name = {os.path.basename(d["file_name"]): d for d in dicts}
    for file_name in ["BloodImage_00338.jpg", "BloodImage_00343.jpg"] + sorted(by_name)[:3]:
        with Image.open(by_name[file_name]["file_name"]) as image:
            assert image.size == (by_name[file_name]["width"], by_name[file_name]["height"])

    names.append("t_bccd_test")
    register_voc("t_bccd_test", root, "test", BCCD_CLASSES, year=2017)
    meta = MetadataCatalog.get("t_bccd_test")
    assert meta.thing_classes == BCCD_CLASSES and meta.split == "test" and meta.year == 2017
    assert meta.evaluator_type == "coco" and meta.dirname == os.path.abspath(root)
    assert len(DatasetCatalog.get("t_bccd_test")) == 72


def test_voc_unknown_class(tmp_path):
    root = shared_data("bccd")
    voc = tmp_path / "voc"
    os.makedirs(voc / "Annotations")
    os.makedirs(voc / "ImageSets" / "Main")
    with open(os.path.join(root, "Annotations", "BloodImage_00001.xml")) as f:
        xml = f.read()
    assert "<name>WBC</name>" in xml
    (voc / "Annotations" / "BloodImage_00001.xml").write_text(
        xml.replace("<name>WBC</name>", "<name>Neutrophil</name>")
    )
    (voc / "ImageSets" / "Main" / "one.txt").write_text("BloodImage_00001\n")
    with pytest.raises(ValueError) as e:
        load_voc_instances(str(voc), "one", BCCD_CLASSES)
    message = str(e.value)
    assert "BloodImage_00001.xml" in message and "'Neutrophil'" in message
    assert "['RBC', 'WBC', 'Platelets']" in message


def test_voc_conventions(tmp_path, names, caplog):
    voc = _voc(
        tmp_path,
        {
            "a": [("cat", 0, (1, 1, 64, 48)), ("dog", 1, (11, 21, 30, 40))],
            "b": [("dog", 0, (5, 5, 5, 9)), ("dog", 0, (5, 5, 20, 20))],
        },
        with_size=False,  # sizes come from the JPEG headers
    )
    with caplog.at_level(logging.WARNING, logger="kd_detr.data.datasets.pascal_voc"):
        dicts = load_voc_instances(voc, "train", ["cat", "dog"])
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"{voc}/Annotations/b.xml"]
    assert [(d["image_id"], d["height"], d["width"]) for d in dicts] == [(0, H, W), (1, H, W)]
    first = dicts[0]["annotations"]
    assert first[0]["bbox"] == [0.0, 0.0, 64.0, 48.0]  # 1-based inclusive -> 0-based
    assert [a["difficult"] for a in first] == [0, 1]
    easy = load_voc_instances(voc, "train", ["cat", "dog"], keep_difficult=False)
    assert [len(d["annotations"]) for d in easy] == [1, 1]
    with pytest.raises(FileNotFoundError, match="ImageSets/Main/val.txt"):
        load_voc_instances(voc, "val", ["cat", "dog"])

    names.append("t_voc")
    register_voc("t_voc", voc, "train", ["cat", "dog"])
    register_voc("t_voc", voc, "train", ["cat", "dog"])  # identical: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_voc("t_voc", voc, "train", ["dog", "cat"])
    coco = convert_to_coco_dict("t_voc")  # what COCO evaluation does without a json_file
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 3


# ---------------------------------------------------------------- config


def test_register_from_config(tmp_path, names):
    json_file, image_root = _coco(tmp_path)
    voc = _voc(tmp_path, {"a": [("cat", 0, (1, 1, 20, 20))]})
    cfg = load_config(freeze=False, register_datasets=False)
    cfg.DATASETS.COCO_JSON = [f"t_cfg_coco, {json_file}, {image_root}"]
    cfg.DATASETS.VOC = [f"t_cfg_voc,{voc},train,cat; dog"]
    names.extend(["t_cfg_coco", "t_cfg_voc"])
    assert register_from_config(cfg) == ["t_cfg_coco", "t_cfg_voc"]
    assert register_from_config(cfg) == ["t_cfg_coco", "t_cfg_voc"]  # already registered: skipped
    assert MetadataCatalog.get("t_cfg_voc").thing_classes == ["cat", "dog"]
    assert len(DatasetCatalog.get("t_cfg_voc")) == 1 and len(DatasetCatalog.get("t_cfg_coco")) == 4


@pytest.mark.parametrize(
    "key,entry",
    [
        ("COCO_JSON", "only_name,file.json"),
        ("COCO_JSON", "name,,images"),
        ("VOC", "name,dir,train"),
        ("VOC", "name,dir,train,cat;;dog"),
        ("VOC", "name,dir,train,cat;cat"),
    ],
)
def test_register_from_config_malformed(key, entry):
    cfg = load_config(freeze=False, register_datasets=False)
    cfg.DATASETS[key] = [entry]
    with pytest.raises(ValueError, match=f"Malformed cfg.DATASETS.{key} entry"):
        register_from_config(cfg)
