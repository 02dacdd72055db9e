# Copyright (c) kd_detr contributors.
"""faster-coco-eval box AP (helper and DatasetEvaluator) against pycocotools' COCOeval."""
import contextlib
import copy
import io
import json
import logging
import math
import uuid
from collections import defaultdict

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.structures import Boxes, Instances

from kd_detr.config import load_config
from kd_detr.evaluation import (
    BOX_STAT_NAMES,
    FastCOCOEvaluator,
    build_evaluator,
    evaluate_coco_boxes,
    per_category_ap,
)
from tests.common import require_module, shared_data

TOL = 1e-6


def _unique(prefix):
    return f"kd_test_{prefix}_{uuid.uuid4().hex[:8]}"


def _quantized_det(rng, image, category_id, x, y, w, h):
    """A detection whose XYXY corners are quarter pixels and whose score is a float32.

    Both survive Detectron2's float32 XYXY -> XYWH conversion exactly, so the evaluator path and
    the pycocotools reference see identical numbers.
    """
    x1 = min(max(round(x * 4) / 4, 0.0), image["width"] - 1.0)
    y1 = min(max(round(y * 4) / 4, 0.0), image["height"] - 1.0)
    x2 = min(max(round((x + w) * 4) / 4, x1 + 1.0), float(image["width"]))
    y2 = min(max(round((y + h) * 4) / 4, y1 + 1.0), float(image["height"]))
    return {
        "image_id": image["id"],
        "category_id": int(category_id),
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "score": float(np.float32(rng.uniform(0.01, 1.0))),
    }


def _perturbed_case(name, tmp_dir, seed):
    """Ground truth with extra crowd boxes (written to tmp_dir) and noisy detections from it."""
    with open(shared_data(name, "annotations", "instances_val2017.json")) as f:
        gt = json.load(f)
    rng = np.random.RandomState(seed)
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0) and rng.rand() < 0.08:
            ann["iscrowd"] = 1
    gt_path = str(tmp_dir / f"{name}_val.json")
    with open(gt_path, "w") as f:
        json.dump(gt, f)

    cat_ids = sorted(c["id"] for c in gt["categories"])
    anns_per_image = defaultdict(list)
    for ann in gt["annotations"]:
        anns_per_image[ann["image_id"]].append(ann)
    images = sorted(gt["images"], key=lambda im: im["id"])
    dets = []
    for k, image in enumerate(images):
        if k == 0 or rng.rand() < 0.15:
            continue  # some images get no detections at all
        for ann in anns_per_image[image["id"]]:
            if rng.rand() < 0.2:
                continue  # missed object
            x, y, w, h = ann["bbox"]
            x, y = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
            w, h = w * math.exp(rng.normal(0, 0.12)), h * math.exp(rng.normal(0, 0.12))
            cat = ann["category_id"] if rng.rand() > 0.1 else rng.choice(cat_ids)
            dets.append(_quantized_det(rng, image, cat, x, y, w, h))
            if rng.rand() < 0.1:  # duplicate
                dets.append(_quantized_det(rng, image, cat, x + 2, y - 1, w, h))
        # False positives; one image gets over 100 of one of its classes, so maxDets matters.
        crowded = [a["category_id"] for a in anns_per_image[image["id"]]] or cat_ids
        fp_cats = [crowded[0]] * 130 if k == 1 else rng.choice(cat_ids[:5], rng.poisson(1.5))
        for cat in fp_cats:
            w, h = rng.uniform(4, 200), rng.uniform(4, 200)
            x, y = rng.uniform(0, image["width"] - 4), rng.uniform(0, image["height"] - 4)
            dets.append(_quantized_det(rng, image, cat, x, y, w, h))
    return gt_path, gt, dets


def _pycocotools_reference(gt_path, dets, max_dets=None):
    """(stats, {cat: AP}, {cat: AP50}) from pycocotools, per-class the way Detectron2 does it."""
    require_module("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        if max_dets is not None:
            coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    precision = coco_eval.eval["precision"]
    assert coco_eval.params.iouThrs[0] == 0.5
    ap, ap50 = {}, {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        for out, p in ((ap, precision[:, :, k, 0, -1]), (ap50, precision[0, :, k, 0, -1])):
            p = p[p > -1]
            out[cat_id] = float(np.mean(p)) if p.size else float("nan")
    return np.asarray(coco_eval.stats), ap, ap50


@pytest.fixture(scope="module", params=[("tiny_coco", 0), ("coco128", 1)], ids=lambda p: p[0])
def case(request, tmp_path_factory):
    name, seed = request.param
    gt_path, gt, dets = _perturbed_case(name, tmp_path_factory.mktemp(name), seed)
    stats, ap, ap50 = _pycocotools_reference(gt_path, dets)
    return {"name": name, "gt_path": gt_path, "gt": gt, "dets": dets, "ref": (stats, ap, ap50)}


def _assert_close_with_nan(actual, expected, tol):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert abs(actual[key] - value) <= tol, (key, actual[key], value)


def test_case_exercises_the_edge_cases(case):
    gt, dets = case["gt"], case["dets"]
    assert sum(a.get("iscrowd", 0) for a in gt["annotations"]) > 0
    assert len({d["image_id"] for d in dets}) < len(gt["images"])
    _, ap, _ = case["ref"]
    assert any(math.isnan(v) for v in ap.values())  # classes without ground truth
    assert 0.05 < case["ref"][0][0] < 0.95


def test_helper_matches_pycocotools(case):
    ref_stats, ref_ap, ref_ap50 = case["ref"]
    dets_before = copy.deepcopy(case["dets"])
    result = evaluate_coco_boxes(case["gt_path"], case["dets"])
    assert case["dets"] == dets_before  # inputs are not modified
    assert result.stats.shape == (len(BOX_STAT_NAMES),)
    np.testing.assert_allclose(result.stats, ref_stats, rtol=0, atol=TOL)
    _assert_close_with_nan(result.per_class_ap, ref_ap, TOL)
    _assert_close_with_nan(result.per_class_ap50, ref_ap50, TOL)
    assert result.category_ids == sorted(ref_ap)
    # A COCO dict gives the same numbers (and is not modified either).
    from_dict = evaluate_coco_boxes(case["gt"], case["dets"])
    np.testing.assert_allclose(from_dict.stats, ref_stats, rtol=0, atol=TOL)


def test_helper_custom_max_dets(case):
    """maxDets=300 (one image has 130 detections of one class): as d2's COCOevalMaxDets."""
    gt_path, dets = case["gt_path"], case["dets"]
    ref_stats, ref_ap, ref_ap50 = _pycocotools_reference(gt_path, dets, max_dets=(1, 10, 300))
    result = evaluate_coco_boxes(gt_path, dets, max_dets=(1, 10, 300))
    # pycocotools' summarize() hard-codes maxDets=100 for stats[0] (-1 here); the rest agree.
    np.testing.assert_allclose(result.stats[1:], ref_stats[1:], rtol=0, atol=TOL)
    _assert_close_with_nan(result.per_class_ap, ref_ap, TOL)
    _assert_close_with_nan(result.per_class_ap50, ref_ap50, TOL)
    default = evaluate_coco_boxes(gt_path, dets)
    assert abs(result.stats[8] - default.stats[8]) > 1e-4  # AR@maxDets[2] changes


def _feed(evaluator, gt, dets, contiguous, batch_size=2):
    dets_per_image = defaultdict(list)
    for d in dets:
        dets_per_image[d["image_id"]].append(d)
    images = sorted(gt["images"], key=lambda im: im["id"])
    evaluator.reset()
    for start in range(0, len(images), batch_size):
        inputs, outputs = [], []
        for image in images[start : start + batch_size]:
            ds = dets_per_image[image["id"]]
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ds)]
            inst = Instances((image["height"], image["width"]))
            inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([d["score"] for d in ds], dtype=torch.float32)
            inst.pred_classes = torch.tensor([contiguous[d["category_id"]] for d in ds]).long()
            inputs.append({"image_id": image["id"]})
            outputs.append({"instances": inst})
        evaluator.process(inputs, outputs)


def test_evaluator_matches_pycocotools(case, tmp_path):
    ref_stats, ref_ap, ref_ap50 = case["ref"]
    gt, name = case["gt"], _unique(case["name"])
    register_coco_instances(name, {}, case["gt_path"], shared_data(case["name"], "val2017"))
    if case["name"] == "tiny_coco":
        DatasetCatalog.get(name)  # metadata as a trainer sees it; coco128 keeps it lazy
    contiguous = {c: i for i, c in enumerate(sorted(c["id"] for c in gt["categories"]))}

    evaluator = FastCOCOEvaluator(name, output_dir=str(tmp_path))
    _feed(evaluator, gt, case["dets"], contiguous)
    results = evaluator.evaluate()
    bbox = results["bbox"]
    for i, key in enumerate(BOX_STAT_NAMES[:6]):
        assert abs(bbox[key] - 100 * ref_stats[i]) <= 100 * TOL, key
    names = {c["id"]: c["name"] for c in gt["categories"]}
    per_class = {cid: bbox["AP-" + names[cid]] / 100 for cid in ref_ap}
    _assert_close_with_nan(per_class, ref_ap, TOL)
    _assert_close_with_nan(evaluator.last_result.per_class_ap50, ref_ap50, TOL)
    # evaluate() neither consumes nor alters the processed predictions.
    _assert_close_with_nan(evaluator.evaluate()["bbox"], bbox, 0.0)

    with open(tmp_path / "coco_instances_results.json") as f:
        written = json.load(f)
    key = lambda d: (d["image_id"], d["score"], d["category_id"])  # noqa: E731
    assert sorted(written, key=key) == sorted(case["dets"], key=key)


def test_converted_dataset_without_json_file(tmp_path):
    """A dataset with only dicts + metadata is converted to COCO json (dataset ids kept)."""
    gt_path = shared_data("coco128", "annotations", "instances_val2017.json")
    name = _unique("coco128_dicts")
    DatasetCatalog.register(name, lambda: load_coco_json(gt_path, "/nonexistent", name))
    with open(gt_path) as f:
        gt = json.load(f)
    contiguous = {c: i for i, c in enumerate(sorted(c["id"] for c in gt["categories"]))}
    rng = np.random.RandomState(3)
    images = {im["id"]: im for im in gt["images"]}
    dets = [
        _quantized_det(rng, images[a["image_id"]], a["category_id"], *a["bbox"])
        for a in gt["annotations"]
        if rng.rand() < 0.7
    ]
    evaluator = FastCOCOEvaluator(name, output_dir=str(tmp_path / "out"), distributed=False)
    _feed(evaluator, gt, dets, contiguous, batch_size=8)
    bbox = evaluator.evaluate()["bbox"]
    converted = tmp_path / "out" / f"{name}_coco_format.json"
    ref_stats, _, _ = _pycocotools_reference(str(converted), dets)
    for i, key in enumerate(BOX_STAT_NAMES[:6]):
        assert abs(bbox[key] - 100 * ref_stats[i]) <= 100 * TOL, key
    assert 60 < bbox["AP"] < 80  # ~70% of the objects found with exact boxes


def _register_synthetic(with_annotations=True):
    """3 images, classes with dataset ids 3 and 7 (contiguous 0 and 1), no json_file."""
    boxes = {1: [(3, [10, 10, 50, 40])], 2: [(7, [0, 0, 20, 20]), (3, [30, 30, 90, 80])], 3: []}
    dicts = []
    for image_id, anns in boxes.items():
        record = {"image_id": image_id, "file_name": f"{image_id}.jpg", "height": 100, "width": 120}
        if with_annotations:
            record["annotations"] = [
                {"bbox": b, "bbox_mode": 0, "category_id": {3: 0, 7: 1}[c], "iscrowd": 0}
                for c, b in anns
            ]
        dicts.append(record)
    name = _unique("synthetic")
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).set(
        thing_classes=["cat3", "cat7"], thing_dataset_id_to_contiguous_id={3: 0, 7: 1}
    )
    return name, boxes


def _instances(xyxy, scores, classes):
    inst = Instances((100, 120))
    inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def test_synthetic_perfect_predictions_and_class_mapping():
    name, boxes = _register_synthetic()
    evaluator = FastCOCOEvaluator(name)  # no output_dir: converted in a temporary directory
    for image_id, anns in boxes.items():
        classes = [{3: 0, 7: 1}[c] for c, _ in anns]
        inst = _instances([b for _, b in anns], [0.9] * len(anns), classes)
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    bbox = evaluator.evaluate()["bbox"]
    assert bbox["AP"] == pytest.approx(100.0) and bbox["AP50"] == pytest.approx(100.0)
    assert bbox["AP-cat3"] == pytest.approx(100.0) and bbox["AP-cat7"] == pytest.approx(100.0)
    assert evaluator.last_result.category_ids == [3, 7]
    # Swapped classes: nothing is right any more.
    evaluator.reset()
    inst = _instances([[0, 0, 20, 20], [30, 30, 90, 80]], [0.9, 0.8], [0, 1])
    evaluator.process([{"image_id": 2}], [{"instances": inst}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(0.0)


@contextlib.contextmanager
def assert_logs_warning(logger_name, text):
    """The block logs a WARNING on ``logger_name`` containing ``text``."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger(logger_name)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
    assert any(text in r.getMessage() for r in records), [r.getMessage() for r in records]


def test_empty_predictions():
    name, boxes = _register_synthetic()
    evaluator = FastCOCOEvaluator(name)
    assert evaluator.evaluate() == {}  # nothing processed: warn and return nothing, like d2
    for image_id in boxes:
        evaluator.process([{"image_id": image_id}], [{"instances": _instances([], [], [])}])
    with assert_logs_warning("kd_detr.evaluation.coco_evaluation", "made no detection"):
        bbox = evaluator.evaluate()["bbox"]
    # Zero detections: 0 where the dataset has ground truth (not NaN), per class too.
    assert set(BOX_STAT_NAMES[:6]) <= set(bbox)
    assert bbox["AP"] == 0.0 and bbox["AP50"] == 0.0 and bbox["AP75"] == 0.0
    assert bbox["AP-cat3"] == 0.0 and bbox["AP-cat7"] == 0.0
    # The helper accepts no detections too: zero AP/AR where ground truth exists.
    coco = {
        "images": [{"id": 1, "width": 50, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "area": 81}
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    result = evaluate_coco_boxes(coco, [])
    assert result.stats[0] == 0 and result.per_class_ap[1] == 0
    assert math.isnan(result.per_class_ap[2]) and math.isnan(result.per_class_ap50[2])


def test_bad_inputs():
    name, _ = _register_synthetic()
    evaluator = FastCOCOEvaluator(name)
    evaluator.process([{"image_id": 1}], [{"instances": _instances([[0, 0, 5, 5]], [0.5], [2])}])
    with pytest.raises(ValueError, match="class id 2.*2 classes"):
        evaluator.evaluate()

    no_anns, _ = _register_synthetic(with_annotations=False)
    with pytest.raises(ValueError, match="no ground truth"):
        FastCOCOEvaluator(no_anns)
    with pytest.raises(ValueError, match="not registered"):
        FastCOCOEvaluator(_unique("missing"))
    with pytest.raises(ValueError, match="only evaluates 'bbox'"):
        FastCOCOEvaluator(name, tasks=("segm",))

    coco = {
        "images": [{"id": 1, "width": 50, "height": 50}],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    det = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.3}
    with pytest.raises(ValueError, match="image_id"):
        evaluate_coco_boxes(coco, [dict(det, image_id=9)])
    with pytest.raises(ValueError, match="category_id"):
        evaluate_coco_boxes(coco, [dict(det, category_id=5)])
    with pytest.raises(ValueError, match="'score'"):
        evaluate_coco_boxes(coco, [{k: v for k, v in det.items() if k != "score"}])


def test_build_evaluator():
    name, _ = _register_synthetic()
    cfg = load_config(freeze=False, register_datasets=False)
    assert isinstance(build_evaluator(cfg, name, None), FastCOCOEvaluator)
    cfg.TEST.EVALUATOR = "voc"
    with pytest.raises(ValueError, match="'voc'.*valid names: coco"):
        build_evaluator(cfg, name, None)


def test_per_category_ap_ignores_missing_entries():
    precision = -np.ones((2, 3, 2, 1, 1))
    precision[:, :, 0, 0, 0] = [[1.0, 0.5, 0.0], [0.5, 0.5, 0.5]]
    np.testing.assert_allclose(per_category_ap(precision), [0.5, np.nan])
    np.testing.assert_allclose(per_category_ap(precision, iou_index=0), [0.5, np.nan])
    np.testing.assert_allclose(per_category_ap(precision, iou_index=1)[:1], [0.5])
