# Copyright (c) kd_detr contributors.
"""COCO open-vocabulary detection (OVR-CNN 48 base / 17 novel split): data and evaluation.

``build_coco_ovd_json`` derives the split jsons from a standard COCO instances json (train: base
annotations only, images without any dropped; val: the 65 OVD classes), ``register_coco_ovd``
caches and registers them, and ``COCOOVDEvaluator`` reports novel / base / all AP50 as per-class
means (Detic's definition) over the classes with ground truth.
"""
import hashlib
import json
import logging
import math
import os
from typing import Dict, List

from tabulate import tabulate

from ..data.datasets.coco_json import register_coco_json
from ..evaluation import EVALUATOR_REGISTRY
from ..evaluation.coco_evaluation import (
    COCOBoxEvalResult,
    FastCOCOEvaluator,
)

__all__ = [
    "COCO_OVD_BASE_IDS",
    "COCO_OVD_NOVEL_IDS",
    "COCO_OVD_IDS",
    "COCOOVDEvaluator",
    "build_coco_ovd_json",
    "register_coco_ovd",
]

logger = logging.getLogger(__name__)

# COCO category ids (see ../shared/data/README.md).
COCO_OVD_NOVEL_IDS = (5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87)
COCO_OVD_BASE_IDS = (
    1, 2, 3, 4, 7, 8, 9, 15, 16, 19, 20, 23, 24, 25, 27, 31, 33, 34, 35, 38, 42, 44, 48, 50,
    51, 52, 53, 54, 55, 56, 57, 59, 60, 62, 65, 70, 72, 73, 74, 75, 78, 79, 80, 82, 84, 85, 86, 90,
)  # fmt: skip
COCO_OVD_IDS = tuple(sorted(COCO_OVD_BASE_IDS + COCO_OVD_NOVEL_IDS))


def build_coco_ovd_json(coco: dict, split: str, vocabulary: int = 65) -> dict:
    """An OVD split of a COCO instances dict.

    Args:
        coco: a COCO instances json (dict with images, annotations, categories).
        split: "train": categories and annotations of the 48 base classes, images without any
            base annotation dropped. "val": annotations of the 65 OVD classes, images without any
            dropped; categories = the 65 OVD classes, or all 80 with ``vocabulary=80`` (Detic's
            test vocabulary; the 15 others have no annotations and are left out of the AP50s).
        vocabulary: val only: 65 or 80.

    Returns:
        A new COCO dict; ``info["ovd"]`` records the split, vocabulary and annotated classes.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if split == "val" and vocabulary not in (65, 80):
        raise ValueError(
            f"The val vocabulary must be 65 (ViLD, RegionCLIP) or 80 (Detic): {vocabulary}"
        )
    annotated = set(COCO_OVD_BASE_IDS if split == "train" else COCO_OVD_IDS)
    listed = set(c["id"] for c in coco["categories"])
    if not annotated <= listed:
        raise ValueError(f"Not a COCO json: it lacks category ids {sorted(annotated - listed)}")
    vocab = annotated if (split == "train" or vocabulary == 65) else listed
    anns = [a for a in coco["annotations"] if a["category_id"] in annotated]
    keep_images = set(a["image_id"] for a in anns)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")}
    out["info"] = dict(
        coco.get("info") or {},
        ovd={
            "split": split,
            "vocabulary": len(vocab),
            "annotated_classes": len(annotated),
            "protocol": "OVR-CNN 48 base / 17 novel",
        },
    )
    out["images"] = [im for im in coco["images"] if im["id"] in keep_images]
    out["annotations"] = anns
    out["categories"] = [c for c in coco["categories"] if c["id"] in vocab]
    return out


def _cached_json(src_json: str, split: str, vocabulary: int, cache_dir: str) -> str:
    src = os.path.abspath(src_json)
    st = os.stat(src)
    key = hashlib.sha1(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(src))[0]
    tag = "train48" if split == "train" else f"val{vocabulary}"
    path = os.path.join(cache_dir, f"{stem}_ovd_{tag}_{key}.json")
    if not os.path.isfile(path):
        with open(src) as f:
            coco = json.load(f)
        derived = build_coco_ovd_json(coco, split, vocabulary)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(derived, f)
        os.replace(tmp, path)
        info = derived["info"]["ovd"]
        logger.info(
            f"COCO-OVD {split}: {len(derived['images'])} images, {len(derived['annotations'])} "
            f"annotations, vocabulary {info['vocabulary']} classes -> {path}"
        )
    return path


def register_coco_ovd(
    name: str,
    json_file: str,
    image_root: str,
    split: str,
    cache_dir: str,
    vocabulary: int = 65,
) -> str:
    """Derive (once, cached by source path, size and mtime) and register a COCO-OVD split.

    Args:
        name: the dataset name, e.g. "coco_ovd_train" / "coco_ovd_val".
        json_file: the standard COCO instances json the split is derived from.
        image_root: its image directory.
        split, vocabulary: see :func:`build_coco_ovd_json`.
        cache_dir: where the derived json is written.

    Returns:
        The derived json path.
    """
    path = _cached_json(json_file, split, vocabulary, cache_dir)
    meta = {"ovd_split": split, "ovd_vocabulary": 48 if split == "train" else vocabulary}
    register_coco_json(name, path, image_root, metadata=meta)
    return path


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@EVALUATOR_REGISTRY.register(name="coco_ovd")
class COCOOVDEvaluator(FastCOCOEvaluator):
    """FastCOCOEvaluator adding COCO-OVD novel / base / all AP50 (percent).

    Each is the mean of per-class AP50 (IoU 0.5, area all, max detections) over the split's
    classes that have ground truth in the evaluated images; the classes left out are logged and
    listed as ``AP50-<split>-excluded-<class>`` (NaN) entries. ``AP50-<split>-num_classes`` is
    the number of classes averaged. The full summary is kept in ``self.last_ovd_summary``.
    When the model detects nothing at all, every metric is 0 where there is ground truth (not
    Detectron2's NaN), so a collapsed model still reports novel / base / all AP50.
    """

    def _derive_results(self, result: COCOBoxEvalResult) -> Dict[str, float]:
        metrics = super()._derive_results(result)
        names = {self._reverse_id_map[i]: n for i, n in enumerate(self._class_names)}
        groups = {"novel": COCO_OVD_NOVEL_IDS, "base": COCO_OVD_BASE_IDS, "all": COCO_OVD_IDS}
        summary, rows = {"vocabulary": len(names)}, []
        for split, ids in groups.items():
            ids = [c for c in ids if c in names]
            used = [c for c in ids if not math.isnan(result.per_class_ap50.get(c, math.nan))]
            excluded = [names[c] for c in ids if c not in used]
            value = _mean([result.per_class_ap50[c] for c in used]) * 100.0
            metrics[f"AP50-{split}"] = value
            metrics[f"AP50-{split}-num_classes"] = float(len(used))
            for n in excluded:
                metrics[f"AP50-{split}-excluded-{n}"] = float("nan")
            summary[split] = {"AP50": value, "classes": [names[c] for c in used]}
            summary[split]["excluded"] = excluded
            rows.append((split, value, len(used), ", ".join(excluded) or "-"))
        self.last_ovd_summary = summary
        logger.info(
            f"COCO-OVD AP50 in % (per-class mean, test vocabulary {len(names)} classes):\n"
            + tabulate(
                rows,
                headers=["split", "AP50 (%)", "#classes", "excluded (no GT)"],
                tablefmt="pipe",
                floatfmt=".3f",
            )
        )
        return metrics
