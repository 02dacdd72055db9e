# Copyright (c) kd_detr contributors.
"""COCO box AP with faster-coco-eval: a pure helper and a Detectron2 ``DatasetEvaluator``.

Neither needs detectron2's compiled ``_C`` (its ``COCOeval_opt``): the per-image matching and the
accumulation run in faster-coco-eval's own C++ extension and reproduce pycocotools' numbers.
"""
import copy
import itertools
import json
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from .build import EVALUATOR_REGISTRY

__all__ = [
    "BOX_STAT_NAMES",
    "COCOBoxEvalResult",
    "FastCOCOEvaluator",
    "evaluate_coco_boxes",
    "instances_to_coco_boxes",
    "load_coco_gt",
    "per_category_ap",
]

logger = logging.getLogger(__name__)

# The 12 numbers of COCOeval.stats for boxes, in order. The three AR@ entries use
# max_dets[0], max_dets[1] and max_dets[2] (1, 10 and 100 by default).
BOX_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BOX_STAT_NAMES += ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_DEFAULT_MAX_DETS = (1, 10, 100)


@dataclass
class COCOBoxEvalResult:
    """Result of :func:`evaluate_coco_boxes`; all values are fractions in [0, 1].

    Attributes:
        stats: (12,) array in pycocotools' ``COCOeval.stats`` order (see ``BOX_STAT_NAMES``);
            -1 where a metric is undefined (e.g. no ground truth of that size).
        category_ids: dataset category ids, sorted, in the order of ``precision``'s class axis.
        per_class_ap: category id -> AP over IoU 0.50:0.95 (NaN for a class without non-crowd GT).
        per_class_ap50: category id -> AP at IoU 0.50 (NaN likewise).
        precision: COCOeval's precision array, shape (T iou, R recall, K class, A area, M maxdets).
        iou_thresholds: (T,) IoU thresholds of ``precision``.
    """

    stats: np.ndarray
    category_ids: List[int]
    per_class_ap: Dict[int, float]
    per_class_ap50: Dict[int, float]
    precision: np.ndarray
    iou_thresholds: np.ndarray

    def summary(self) -> Dict[str, float]:
        """The six AP numbers in percent, keyed like Detectron2 (NaN where undefined)."""
        return {name: _to_percent(self.stats[i]) for i, name in enumerate(BOX_STAT_NAMES[:6])}


def _to_percent(value) -> float:
    value = float(value)
    return value * 100.0 if value >= 0 else float("nan")


def per_category_ap(precision: np.ndarray, iou_index: Optional[int] = None) -> np.ndarray:
    """Per-class AP from a COCOeval precision array, as Detectron2 computes it.

    Args:
        precision: array of shape (T, R, K, A, M); -1 marks entries without ground truth.
        iou_index: index into T for AP at a single IoU threshold; None averages all thresholds.

    Returns:
        (K,) float array: mean of the valid (> -1) precisions at area "all" and the largest
        maxDets, NaN for a class without any.
    """
    p = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]
    if iou_index is not None:
        p = p[iou_index : iou_index + 1]
    valid = p > -1
    counts = valid.sum(axis=(0, 1))
    sums = np.where(valid, p, 0.0).sum(axis=(0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def load_coco_gt(coco_gt) -> COCO:
    """Ground truth as a ``faster_coco_eval.COCO``: a json path, a COCO dict (deep-copied) or one.

    Raises:
        ValueError: when it has no ``annotations`` or no ``categories``.
    """
    if isinstance(coco_gt, COCO):
        api = coco_gt
    elif isinstance(coco_gt, dict):
        api = COCO(coco_gt, use_deepcopy=True)
    elif isinstance(coco_gt, (str, os.PathLike)):
        api = COCO(PathManager.get_local_path(os.fspath(coco_gt)))
    else:
        raise TypeError(f"coco_gt must be a json path, a COCO dict or a COCO, not {type(coco_gt)}")
    if "annotations" not in api.dataset:
        raise ValueError("COCO ground truth has no 'annotations' list: nothing to evaluate against")
    if not api.getCatIds():
        raise ValueError("COCO ground truth has no 'categories'")
    return api


def _normalize_detections(detections, coco_api: COCO) -> List[dict]:
    """Fresh, validated copies of COCO result dicts (image_id, category_id, bbox XYWH, score)."""
    out = []
    for i, det in enumerate(detections):
        try:
            box = [float(v) for v in det["bbox"]]
            ids = {"image_id": int(det["image_id"]), "category_id": int(det["category_id"])}
            out.append(dict(ids, bbox=box, score=float(det["score"])))
        except KeyError as e:
            raise ValueError(
                f"Detection #{i} has no {e} field; COCO results need image_id, category_id, "
                "bbox (XYWH, absolute pixels) and score"
            ) from None
        if len(box) != 4:
            raise ValueError(f"Detection #{i} has bbox {det['bbox']}; expected [x, y, w, h]")
    for field, known in (("image_id", coco_api.getImgIds()), ("category_id", coco_api.getCatIds())):
        unknown = sorted({d[field] for d in out} - set(known))
        if unknown:
            raise ValueError(
                f"{len(unknown)} distinct detection {field}s are not in the ground truth, "
                f"e.g. {unknown[:5]}"
            )
    return out


def evaluate_coco_boxes(
    coco_gt,
    detections: Sequence[dict],
    *,
    img_ids: Optional[Sequence[int]] = None,
    max_dets: Sequence[int] = _DEFAULT_MAX_DETS,
    cat_ids: Optional[Sequence[int]] = None,
) -> COCOBoxEvalResult:
    """Evaluate COCO box detections with faster-coco-eval; numbers match pycocotools' COCOeval.

    Args:
        coco_gt: ground truth: json path, COCO-format dict or ``faster_coco_eval.COCO``.
            Crowd annotations (iscrowd=1) are ignore regions, as in COCOeval.
        detections: COCO result dicts with image_id, category_id (dataset ids), bbox (XYWH)
            and score. They are copied, never modified. May be empty.
        img_ids: evaluate only these images (default: every image of the ground truth).
        max_dets: COCOeval maxDets, three increasing limits; AP uses the last one.
        cat_ids: evaluate only these dataset category ids (COCOeval ``params.catIds``; default:
            every category of the ground truth), e.g. the base or novel classes.

    Returns:
        COCOBoxEvalResult.

    Raises:
        ValueError: a detection lacks a field or names an image or category not in coco_gt.
    """
    coco_api = load_coco_gt(coco_gt)
    max_dets = [int(m) for m in max_dets]
    if len(max_dets) != 3 or sorted(max_dets) != max_dets:
        raise ValueError(f"max_dets must be three increasing integers, got {max_dets}")
    dets = _normalize_detections(detections, coco_api)
    if img_ids is not None:
        img_ids = [int(i) for i in img_ids]
        unknown = sorted(set(img_ids) - set(coco_api.getImgIds()))
        if unknown:
            raise ValueError(f"img_ids {unknown[:5]} ({len(unknown)} in all) are not in coco_gt")

    if cat_ids is not None:
        cat_ids = sorted(int(c) for c in cat_ids)
        unknown = sorted(set(cat_ids) - set(coco_api.getCatIds()))
        if unknown or not cat_ids:
            raise ValueError(f"cat_ids {cat_ids} must be non-empty category ids of coco_gt")

    coco_dt = coco_api.loadRes(dets)
    coco_eval = COCOeval_faster(coco_api, coco_dt, "bbox", print_function=logger.debug)
    coco_eval.params.maxDets = max_dets
    if img_ids is not None:
        coco_eval.params.imgIds = img_ids
    if cat_ids is not None:
        coco_eval.params.catIds = cat_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()

    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
    iou_thrs = np.asarray(coco_eval.params.iouThrs, dtype=np.float64)
    cat_ids = [int(c) for c in coco_eval.params.catIds]
    ap = per_category_ap(precision)
    ap50 = per_category_ap(precision, iou_index=int(np.argmin(np.abs(iou_thrs - 0.5))))
    return COCOBoxEvalResult(
        stats=np.asarray(coco_eval.stats[: len(BOX_STAT_NAMES)], dtype=np.float64),
        category_ids=cat_ids,
        per_class_ap={c: float(v) for c, v in zip(cat_ids, ap)},
        per_class_ap50={c: float(v) for c, v in zip(cat_ids, ap50)},
        precision=precision,
        iou_thresholds=iou_thrs,
    )


def instances_to_coco_boxes(instances, image_id) -> List[dict]:
    """COCO result dicts (XYWH boxes, contiguous class ids) from an ``Instances`` on any device.

    Raises:
        ValueError: when the instances lack pred_boxes, scores or pred_classes.
    """
    if len(instances) == 0:
        return []
    missing = [k for k in ("pred_boxes", "scores", "pred_classes") if not instances.has(k)]
    if missing:
        raise ValueError(f"Predicted Instances for image {image_id} have no field(s) {missing}")
    boxes = instances.pred_boxes.tensor.detach().to("cpu", torch.float32).clone()
    boxes[:, 2:] -= boxes[:, :2]  # XYXY_ABS -> XYWH_ABS
    scores = instances.scores.detach().cpu().tolist()
    classes = instances.pred_classes.detach().cpu().tolist()
    return [
        {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
        for b, s, c in zip(boxes.tolist(), scores, classes)
    ]


@EVALUATOR_REGISTRY.register(name="coco")
class FastCOCOEvaluator(DatasetEvaluator):
    """COCO box AP of a registered dataset, a bbox-only stand-in for ``COCOEvaluator``.

    Uses faster-coco-eval, so it runs without detectron2's compiled extension. ``evaluate()``
    returns ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>", ...}}`` in
    percent (NaN where undefined); the full :class:`COCOBoxEvalResult` (with per-class AP50) is
    kept in ``self.last_result``. Subclasses may override :meth:`_derive_results`.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        *,
        max_dets_per_image: Optional[int] = None,
        tasks: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            dataset_name: a dataset registered in DatasetCatalog/MetadataCatalog. Uses metadata
                ``json_file`` when set; otherwise the dataset dicts are converted to COCO json
                (into ``output_dir``, or a temporary directory).
            output_dir: where to write ``coco_instances_results.json`` (None: write nothing).
            distributed: gather predictions from all ranks and evaluate on the main one.
            max_dets_per_image: AP's detection limit per image (COCO default 100).
            tasks: accepted for COCOEvaluator compatibility; only ("bbox",) is supported.
        """
        if tasks is not None and set(tasks) - {"bbox"}:
            raise ValueError(f"FastCOCOEvaluator only evaluates 'bbox', got tasks={tasks}")
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._max_dets = [1, 10, 100 if max_dets_per_image is None else int(max_dets_per_image)]
        self._metadata = MetadataCatalog.get(dataset_name)
        self._coco_api = self._load_ground_truth()
        self._do_evaluation = len(self._coco_api.dataset.get("annotations") or []) > 0
        self._reverse_id_map, self._class_names = self._category_mapping()
        self.reset()

    def _load_ground_truth(self) -> COCO:
        name = self._dataset_name
        json_file = self._metadata.get("json_file", None)
        if json_file:
            return COCO(PathManager.get_local_path(json_file), print_function=logger.debug)
        if name not in DatasetCatalog.list():
            raise ValueError(f"Dataset '{name}' is not registered and has no 'json_file' metadata")
        logger.info(f"Converting dataset '{name}' to COCO format for evaluation ...")
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            api = self._convert(os.path.join(self._output_dir, f"{name}_coco_format.json"))
        else:
            with tempfile.TemporaryDirectory(prefix="kd_detr_coco_eval_") as tmp:
                api = self._convert(os.path.join(tmp, f"{name}_coco_format.json"))
        if not api.dataset.get("annotations"):
            raise ValueError(
                f"Dataset '{name}' has no 'json_file' metadata and its dataset dicts carry no "
                "'annotations': there is no ground truth to evaluate against"
            )
        return api

    def _convert(self, path: str) -> COCO:
        convert_to_coco_json(self._dataset_name, path)
        return COCO(path, print_function=logger.debug)

    def _category_mapping(self):
        """(contiguous id -> dataset id, class names by contiguous id), checked against the json."""
        categories = self._coco_api.dataset.get("categories") or []
        if not categories:
            raise ValueError(f"The COCO json of dataset '{self._dataset_name}' has no categories")
        gt_cats = {int(c["id"]): c.get("name", str(c["id"])) for c in categories}
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        if mapping is None:
            # What load_coco_json would set: sorted dataset ids -> 0..K-1 (identity for
            # datasets converted without a mapping, whose json ids are already contiguous).
            mapping = {cid: i for i, cid in enumerate(sorted(gt_cats))}
        reverse = {int(v): int(k) for k, v in mapping.items()}
        if sorted(reverse) != list(range(len(reverse))):
            raise ValueError(
                f"thing_dataset_id_to_contiguous_id of '{self._dataset_name}' must map onto "
                f"0..{len(mapping) - 1}, got values {sorted(reverse)}"
            )
        unknown = sorted(set(reverse.values()) - set(gt_cats))
        if unknown:
            raise ValueError(
                f"Dataset '{self._dataset_name}': category ids {unknown} of the metadata are not "
                "in the ground-truth json's categories"
            )
        names = self._metadata.get("thing_classes", None)
        if names is None or len(names) != len(reverse):
            names = [gt_cats[reverse[i]] for i in range(len(reverse))]
        return reverse, list(names)

    def reset(self):
        self._predictions = []
        self.last_result: Optional[COCOBoxEvalResult] = None

    def process(self, inputs, outputs):
        """
        Args:
            inputs: list of dicts with at least "image_id" (the dataset's / json's image id).
            outputs: list of dicts with "instances": Instances with pred_boxes (XYXY_ABS in the
                original image size), scores and pred_classes (contiguous ids).
        """
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            image_id = inp["image_id"]
            boxes = instances_to_coco_boxes(out["instances"], image_id)
            self._predictions.append({"image_id": image_id, "instances": boxes})

    def evaluate(self, img_ids: Optional[Sequence[int]] = None):
        """
        Args:
            img_ids: evaluate only these image ids (default: every image of the dataset).

        Returns:
            OrderedDict {"bbox": metrics} on the main process; {} elsewhere or with no input.
        """
        if self._distributed:
            comm.synchronize()
            predictions = comm.gather(self._predictions, dst=0)
            predictions = list(itertools.chain(*predictions))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions

        if len(predictions) == 0:
            logger.warning("[FastCOCOEvaluator] Did not receive valid predictions.")
            return {}

        coco_results = self._to_dataset_ids(itertools.chain(*[p["instances"] for p in predictions]))

        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            file_path = os.path.join(self._output_dir, "coco_instances_results.json")
            logger.info(f"Saving results to {file_path}")
            with PathManager.open(file_path, "w") as f:
                f.write(json.dumps(coco_results))

        if not self._do_evaluation:
            logger.info("Annotations are not available for evaluation.")
            return OrderedDict()

        if len(coco_results) == 0:
            logger.warning(
                f"The model made no detection on {self._dataset_name}: every AP with ground truth "
                "is 0 (NaN only where the dataset defines none, e.g. APl without large objects)."
            )
        else:
            logger.info(f"Evaluating {len(coco_results)} boxes with faster-coco-eval ...")
        self.last_result = evaluate_coco_boxes(
            self._coco_api, coco_results, img_ids=img_ids, max_dets=self._max_dets
        )
        metrics = self._derive_results(self.last_result)
        return OrderedDict({"bbox": copy.deepcopy(metrics)})

    def _to_dataset_ids(self, coco_results) -> List[dict]:
        """Copies of the results with contiguous class ids mapped back to dataset category ids."""
        out, num_classes = [], len(self._reverse_id_map)
        for r in coco_results:
            c = r["category_id"]
            if c not in self._reverse_id_map:
                raise ValueError(
                    f"A prediction for image {r['image_id']} has class id {c}, but dataset "
                    f"'{self._dataset_name}' has {num_classes} classes: predicted class ids "
                    f"must be contiguous ids in [0, {num_classes - 1}]"
                )
            out.append(dict(r, category_id=self._reverse_id_map[c]))
        return out

    def _derive_results(self, result: COCOBoxEvalResult) -> Dict[str, float]:
        """Detectron2-style metrics dict (percent) from a result; logs the AP tables."""
        metrics = result.summary()
        logger.info("Evaluation results for bbox (AP in %): \n" + create_small_table(metrics))
        if not np.isfinite(sum(metrics.values())):
            logger.info("Some metrics cannot be computed and are shown as NaN.")

        rows = []
        for contiguous_id, name in enumerate(self._class_names):
            dataset_id = self._reverse_id_map[contiguous_id]
            ap = result.per_class_ap[dataset_id] * 100.0
            ap50 = result.per_class_ap50[dataset_id] * 100.0
            rows.append((name, ap, ap50))
            metrics["AP-" + name] = ap
        logger.info("Per-category bbox AP (%): \n" + _per_class_table(rows))
        return metrics


def _per_class_table(rows, max_cols: int = 3) -> str:
    """A pipe table of (class, AP, AP50) triples, ``max_cols`` triples per line."""
    n = max(1, min(max_cols, len(rows)))
    flat = list(itertools.chain(*rows))
    lines = itertools.zip_longest(*[flat[i :: 3 * n] for i in range(3 * n)])
    headers = ["category", "AP (%)", "AP50 (%)"] * n
    return tabulate(lines, tablefmt="pipe", floatfmt=".3f", headers=headers, numalign="left")
