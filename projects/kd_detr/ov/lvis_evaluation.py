# Copyright (c) kd_detr contributors.
"""LVIS box AP (AP, AP50, AP75, APs/m/l, APr/c/f) on the faster-coco-eval engine.

The numbers are lvis-api's ``LVISEval`` for boxes: at most 300 detections per image (the
highest-scoring ones over all classes), detections of a class neither annotated nor listed in the
image's ``neg_category_ids`` are not evaluated, unmatched detections of a class in
``not_exhaustive_category_ids`` are ignored, every annotation counts (no crowd regions), and a
class without ground truth is left out of the means. faster-coco-eval's ``lvis_style`` mode runs
the matching in C++.
"""
import copy
import itertools
import json
import logging
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from faster_coco_eval import COCOeval_faster
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..evaluation import EVALUATOR_REGISTRY
from ..evaluation.coco_evaluation import (
    FastCOCOEvaluator,
    _normalize_detections,
    load_coco_gt,
    per_category_ap,
)
from .lvis_split import LVIS_FREQUENCIES

__all__ = ["LVISBoxEvalResult", "LVISEvaluator", "evaluate_lvis_boxes", "limit_detections"]

logger = logging.getLogger(__name__)

# LVIS protocol: detections per image (over all classes).
LVIS_MAX_DETS = 300
_AREAS = ("all", "small", "medium", "large")


@dataclass
class LVISBoxEvalResult:
    """Result of :func:`evaluate_lvis_boxes`; all values are fractions in [0, 1].

    Attributes:
        stats: "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@<k>",
            "ARs@<k>", "ARm@<k>", "ARl@<k>" (k = max detections); NaN where undefined.
        category_ids: dataset category ids, sorted (the class axis of ``precision``).
        frequencies: category id -> "r" / "c" / "f".
        per_class_ap, per_class_ap50: category id -> AP (NaN for a class without ground truth).
        precision: (T iou, R recall, K class, A area, 1) array, -1 where undefined.
        recall: (T, K, A, 1) array.
    """

    stats: Dict[str, float]
    category_ids: List[int]
    frequencies: Dict[int, str]
    per_class_ap: Dict[int, float]
    per_class_ap50: Dict[int, float]
    precision: np.ndarray
    recall: np.ndarray

    def classes_with_gt(self, frequency: Optional[str] = None) -> List[int]:
        """Category ids that have ground truth (optionally of one frequency group)."""
        return [
            c
            for c in self.category_ids
            if not np.isnan(self.per_class_ap[c])
            and (frequency is None or self.frequencies[c] == frequency)
        ]


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else float("nan")


def limit_detections(detections: Sequence[dict], max_dets: int) -> List[dict]:
    """Each image's ``max_dets`` highest-scoring detections (ties keep the input order).

    Args:
        detections: COCO result dicts with image_id and score.
        max_dets: per-image limit over all classes (LVIS: 300); < 0 keeps everything.
    """
    if max_dets < 0:
        return list(detections)
    by_image = defaultdict(list)
    for det in detections:
        by_image[det["image_id"]].append(det)
    out = []
    for dets in by_image.values():
        if len(dets) > max_dets:
            order = np.argsort(-np.asarray([d["score"] for d in dets]), kind="stable")
            dets = [dets[i] for i in order[:max_dets]]
        out.extend(dets)
    return out


def _check_lvis_gt(coco_api) -> Dict[int, str]:
    """Category id -> frequency; raises when the ground truth lacks LVIS's fields."""
    frequencies = {}
    for cat in coco_api.dataset["categories"]:
        if cat.get("frequency") not in LVIS_FREQUENCIES:
            raise ValueError(
                f"Category {cat.get('id')} ({cat.get('name')}) of the ground truth has no LVIS "
                f"'frequency' in {LVIS_FREQUENCIES}: LVIS evaluation needs an LVIS json; use "
                "TEST.EVALUATOR coco for COCO-format data"
            )
        frequencies[int(cat["id"])] = cat["frequency"]
    for image in coco_api.dataset["images"]:
        missing = [k for k in ("neg_category_ids", "not_exhaustive_category_ids") if k not in image]
        if missing:
            raise ValueError(
                f"Image {image.get('id')} of the ground truth has no {missing}: LVIS evaluation "
                "needs an LVIS json (federated labels per image); use TEST.EVALUATOR coco for "
                "COCO-format data"
            )
    return frequencies


def evaluate_lvis_boxes(
    lvis_gt,
    detections: Sequence[dict],
    *,
    max_dets: int = LVIS_MAX_DETS,
    img_ids: Optional[Sequence[int]] = None,
) -> LVISBoxEvalResult:
    """Evaluate box detections on LVIS; numbers match lvis-api's ``LVISEval(..., "bbox")``.

    Args:
        lvis_gt: LVIS ground truth: json path, dict (deep-copied) or ``faster_coco_eval.COCO``
            (its annotations' ``iscrowd`` is set to 0 in place: LVIS has no crowd regions).
        detections: COCO result dicts (image_id, category_id as dataset id, XYWH bbox, score);
            copied, never modified. May be empty (every metric is then NaN).
        max_dets: detections kept per image, the highest-scoring (LVIS: 300).
        img_ids: evaluate only these images (default: all of the ground truth).

    Raises:
        ValueError: the ground truth is not LVIS-format, or a detection is malformed or names
            an image or category not in it.
    """
    coco_api = load_coco_gt(lvis_gt)
    frequencies = _check_lvis_gt(coco_api)
    for ann in coco_api.dataset["annotations"]:
        ann["iscrowd"] = 0
    max_dets = int(max_dets)
    if max_dets <= 0:
        raise ValueError(f"max_dets must be a positive number of detections per image: {max_dets}")
    dets = limit_detections(_normalize_detections(detections, coco_api), max_dets)
    cat_ids = sorted(frequencies)
    stats_keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]
    stats_keys += [f"AR{a}@{max_dets}" for a in ("", "s", "m", "l")]
    if not dets:
        nan = {c: float("nan") for c in cat_ids}
        empty = np.zeros((0,))
        stats = {k: float("nan") for k in stats_keys}
        return LVISBoxEvalResult(stats, cat_ids, frequencies, nan, dict(nan), empty, empty)

    coco_eval = COCOeval_faster(
        coco_api, coco_api.loadRes(dets), "bbox", lvis_style=True, print_function=logger.debug
    )
    coco_eval.params.maxDets = [max_dets]
    coco_eval.params.catIds = cat_ids
    if img_ids is not None:
        unknown = sorted(set(int(i) for i in img_ids) - set(coco_api.getImgIds()))
        if unknown:
            raise ValueError(f"img_ids {unknown[:5]} ({len(unknown)} in all) are not in lvis_gt")
        coco_eval.params.imgIds = [int(i) for i in img_ids]
    coco_eval.evaluate()
    coco_eval.accumulate()

    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
    recall = np.asarray(coco_eval.eval["recall"], dtype=np.float64)
    iou_thrs = np.asarray(coco_eval.params.iouThrs, dtype=np.float64)
    t50, t75 = (int(np.argmin(np.abs(iou_thrs - t))) for t in (0.5, 0.75))
    groups = {f: [k for k, c in enumerate(cat_ids) if frequencies[c] == f] for f in "rcf"}
    stats = {
        "AP": _mean_valid(precision[:, :, :, 0]),
        "AP50": _mean_valid(precision[t50, :, :, 0]),
        "AP75": _mean_valid(precision[t75, :, :, 0]),
    }
    for a, area in enumerate(_AREAS[1:], start=1):
        stats["AP" + area[0]] = _mean_valid(precision[:, :, :, a])
    for f, ks in groups.items():
        stats["AP" + f] = _mean_valid(precision[:, :, ks, 0])
    for a, area in enumerate(_AREAS):
        stats[f"AR{'' if a == 0 else area[0]}@{max_dets}"] = _mean_valid(recall[:, :, a])
    ap, ap50 = per_category_ap(precision), per_category_ap(precision, iou_index=t50)
    return LVISBoxEvalResult(
        stats={k: stats[k] for k in stats_keys},
        category_ids=cat_ids,
        frequencies=frequencies,
        per_class_ap={c: float(v) for c, v in zip(cat_ids, ap)},
        per_class_ap50={c: float(v) for c, v in zip(cat_ids, ap50)},
        precision=precision,
        recall=recall,
    )


@EVALUATOR_REGISTRY.register(name="lvis")
class LVISEvaluator(FastCOCOEvaluator):
    """LVIS box AP of a registered LVIS dataset (``TEST.EVALUATOR lvis``).

    The ground truth is the dataset's ``json_file`` metadata (an LVIS json with frequencies and
    per-image negative / not-exhaustive lists, e.g. Detectron2's ``lvis_v1_val``). ``evaluate()``
    returns ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
    "AR@300", ..., "APr-num_classes", ...}}`` in percent (NaN where undefined);
    ``AP<f>-num_classes`` counts the classes with ground truth averaged into ``AP<f>``. The full
    :class:`LVISBoxEvalResult` is kept in ``self.last_result`` and the per-frequency class lists
    (with and without ground truth) in ``self.last_lvis_summary``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        *,
        max_dets_per_image: int = LVIS_MAX_DETS,
        tasks: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            dataset_name: a registered LVIS dataset with ``json_file`` metadata.
            output_dir: where to write ``lvis_instances_results.json`` (None: nowhere).
            distributed: gather predictions from all ranks and evaluate on the main one.
            max_dets_per_image: top-k detections kept per image (LVIS protocol: 300).
            tasks: only ("bbox",) is supported.
        """
        if int(max_dets_per_image) <= 0:
            raise ValueError(f"max_dets_per_image must be positive, got {max_dets_per_image}")
        self._lvis_max_dets = int(max_dets_per_image)
        super().__init__(dataset_name, output_dir, distributed, tasks=tasks)
        self._frequencies = _check_lvis_gt(self._coco_api)

    def _load_ground_truth(self):
        if not self._metadata.get("json_file", None):
            raise ValueError(
                f"Dataset '{self._dataset_name}' has no 'json_file' metadata: LVIS evaluation "
                "needs its LVIS json (frequencies, neg_category_ids, not_exhaustive_category_ids). "
                "Evaluate on an LVIS val split, e.g. lvis_v1_val or one registered with "
                "register_lvis_ovd(..., split='val')"
            )
        return super()._load_ground_truth()

    def process(self, inputs, outputs):
        """As :meth:`FastCOCOEvaluator.process`, keeping each image's top-k detections only."""
        start = len(self._predictions)
        super().process(inputs, outputs)
        for prediction in self._predictions[start:]:
            prediction["instances"] = limit_detections(prediction["instances"], self._lvis_max_dets)

    def evaluate(self, img_ids: Optional[Sequence[int]] = None):
        """
        Returns:
            OrderedDict {"bbox": metrics} on the main process; {} elsewhere or with no input.
        """
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if len(predictions) == 0:
            logger.warning("[LVISEvaluator] Did not receive valid predictions.")
            return {}

        results = self._to_dataset_ids(itertools.chain(*[p["instances"] for p in predictions]))
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            logger.info(f"Saving results to {path}")
            with PathManager.open(path, "w") as f:
                f.write(json.dumps(results))
        if not self._do_evaluation:
            logger.info("Annotations are not available for evaluation.")
            return OrderedDict()
        if not results:
            logger.warning("No predictions from the model!")
        logger.info(f"Evaluating {len(results)} boxes (LVIS, faster-coco-eval) ...")
        self.last_result = evaluate_lvis_boxes(
            self._coco_api, results, max_dets=self._lvis_max_dets, img_ids=img_ids
        )
        return OrderedDict({"bbox": copy.deepcopy(self._derive_results(self.last_result))})

    def _derive_results(self, result: LVISBoxEvalResult) -> Dict[str, float]:
        metrics = {k: v * 100.0 for k, v in result.stats.items()}
        logger.info("Evaluation results for bbox (LVIS, AP in %): \n" + create_small_table(metrics))
        names = {self._reverse_id_map[i]: n for i, n in enumerate(self._class_names)}
        summary, rows = {}, []
        for f in LVIS_FREQUENCIES:
            ids = [c for c in result.category_ids if result.frequencies[c] == f]
            with_gt = set(result.classes_with_gt(f))
            summary[f] = {
                "AP": metrics["AP" + f],
                "classes": [names[c] for c in ids if c in with_gt],
                "excluded": [names[c] for c in ids if c not in with_gt],
            }
            metrics[f"AP{f}-num_classes"] = float(len(with_gt))
            rows.append((f, metrics["AP" + f], len(with_gt), len(ids) - len(with_gt)))
        self.last_lvis_summary = summary
        logger.info(
            "LVIS AP (%) by frequency (classes without ground truth are excluded):\n"
            + tabulate(
                rows,
                headers=["frequency", "AP (%)", "#classes", "#excluded (no GT)"],
                tablefmt="pipe",
                floatfmt=".3f",
            )
        )
        return metrics
