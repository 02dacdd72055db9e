# Copyright (c) kd_detr contributors.
"""LVIS v1 open-vocabulary split (novel = rare, base = common + frequent) and its cat_info.

``lvis_v1_train_norare`` is ``lvis_v1_train`` with every rare ("r") annotation removed. The
category list and its contiguous index stay those of the full 1203 classes, so a model trained on
it predicts in the same 1203-class space it is tested in (``lvis_v1_val``, the whole vocabulary);
rare classes simply never get a positive label in training. Detectron2's own registration provides
``lvis_v1_train`` / ``lvis_v1_val``; importing this module adds ``lvis_v1_train_norare`` under the
same root (``$DETECTRON2_DATASETS``, default ``./datasets``: ``lvis/lvis_v1_train.json`` and the
COCO images in ``coco/train2017``, ``coco/val2017``).
"""
import copy
import json
import logging
import os
from collections import defaultdict
from typing import Iterable, List, Optional, Sequence

from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import get_lvis_instances_meta
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

__all__ = [
    "LVIS_FREQUENCIES",
    "build_lvis_cat_info",
    "build_lvis_norare_json",
    "load_lvis_ovd_json",
    "register_all_lvis_ovd",
    "register_lvis_ovd",
]

logger = logging.getLogger(__name__)

# Frequency groups of LVIS categories by training images: rare < 10, common < 100, frequent.
LVIS_FREQUENCIES = ("r", "c", "f")
# Builtin open-vocabulary splits: name -> (source json under the root, image root under the root).
_BUILTIN_LVIS_OVD = {"lvis_v1_train_norare": ("lvis/lvis_v1_train.json", "coco/")}


def _check_lvis_dict(lvis: dict, source: str, need_frequency: bool) -> None:
    if not isinstance(lvis, dict):
        raise ValueError(f"{source} is not an LVIS json: its top level is not an object")
    missing = [k for k in ("images", "annotations", "categories") if k not in lvis]
    if missing:
        raise ValueError(f"{source} is not an LVIS json: it lacks the key(s) {missing}")
    if need_frequency:
        cats = lvis["categories"]
        bad = [c.get("id") for c in cats if c.get("frequency") not in LVIS_FREQUENCIES]
        if bad:
            raise ValueError(
                f"{source}: {len(bad)} categories (e.g. ids {bad[:5]}) have no LVIS 'frequency' "
                f"in {LVIS_FREQUENCIES}; the open-vocabulary split needs the r/c/f labels of an "
                "LVIS v1 json (lvis_v1_train.json)"
            )


def _ids_of(lvis: dict, frequencies: Iterable[str]) -> set:
    frequencies = set(frequencies)
    return {c["id"] for c in lvis["categories"] if c.get("frequency") in frequencies}


def build_lvis_norare_json(lvis: dict, removed: Sequence[str] = ("r",)) -> dict:
    """The open-vocabulary training split of an LVIS dict: annotations of ``removed`` frequencies
    dropped.

    Everything else is kept as is: all categories (so the class index is the full vocabulary's),
    all images (empty ones are handled by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``) and the other
    annotations (the same dicts, in the same order). The removed ids are also taken out of each
    image's ``neg_category_ids`` and ``not_exhaustive_category_ids``, so no label of a novel class
    is left. ``info["lvis_ovd"]`` records what was removed. The input is not modified.

    Args:
        lvis: an LVIS json dict (images, annotations, categories with "frequency").
        removed: frequency groups to remove, default the rare classes.
    """
    removed = tuple(removed)
    if set(removed) - set(LVIS_FREQUENCIES):
        raise ValueError(f"removed must be among {LVIS_FREQUENCIES}, got {removed}")
    _check_lvis_dict(lvis, "LVIS dict", need_frequency=True)
    drop = _ids_of(lvis, removed)
    out = {k: v for k, v in lvis.items() if k not in ("images", "annotations", "info")}
    out["info"] = dict(lvis.get("info") or {}, lvis_ovd={"removed_frequencies": list(removed)})
    out["annotations"] = [a for a in lvis["annotations"] if a["category_id"] not in drop]
    images = []
    for image in lvis["images"]:
        image = dict(image)
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in image:
                image[key] = [c for c in image[key] if c not in drop]
        images.append(image)
    out["images"] = images
    return out


def build_lvis_cat_info(
    lvis: dict, zero_frequencies: Sequence[str] = ("r",), progress: bool = False
) -> List[dict]:
    """Per-category training counts, in the format of Detic's ``lvis_v1_train_cat_info.json``.

    Args:
        lvis: an LVIS json dict (e.g. lvis_v1_train.json).
        zero_frequencies: set ``image_count`` and ``instance_count`` of these frequency groups to
            0 (default rare: the counts of the open-vocabulary training split, where rare classes
            are unseen, so the federated loss never samples them; Detic#79). ``()`` keeps them.
        progress: show a progress bar over the annotations.

    Returns:
        The json's categories sorted by id (copies, all fields kept), each with
        ``image_count`` = number of images with at least one annotation of the class and
        ``instance_count`` = number of its annotations.
    """
    _check_lvis_dict(lvis, "LVIS dict", need_frequency=bool(zero_frequencies))
    images, instances = defaultdict(set), defaultdict(int)
    for ann in tqdm(lvis["annotations"], desc="Counting", unit="ann", disable=not progress):
        images[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    unknown = sorted(set(instances) - {c["id"] for c in lvis["categories"]})
    if unknown:
        raise ValueError(f"Annotations use category ids {unknown[:5]} not in 'categories'")
    zeroed = _ids_of(lvis, zero_frequencies)
    out = []
    for cat in sorted(lvis["categories"], key=lambda c: c["id"]):
        cat = copy.deepcopy(cat)
        keep = cat["id"] not in zeroed
        cat["image_count"] = len(images[cat["id"]]) if keep else 0
        cat["instance_count"] = instances[cat["id"]] if keep else 0
        out.append(cat)
    return out


def _image_path(image_root: str, image: dict) -> str:
    # LVIS v1 names images by their COCO url (".../train2017/000000391895.jpg"): the file is
    # <image_root>/<split folder>/<file>. Jsons with a plain "file_name" are read relative to root.
    if "coco_url" in image:
        split_folder, file_name = image["coco_url"].split("/")[-2:]
        return os.path.join(image_root, split_folder, file_name)
    if "file_name" in image:
        return os.path.join(image_root, image["file_name"])
    raise ValueError(f"LVIS image {image.get('id')} has neither 'coco_url' nor 'file_name'")


def _valid_polygons(segmentation) -> Optional[list]:
    if not isinstance(segmentation, list):
        return None
    polygons = [p for p in segmentation if len(p) % 2 == 0 and len(p) >= 6]
    return polygons or None


def load_lvis_ovd_json(
    json_file: str,
    image_root: str,
    removed: Sequence[str] = ("r",),
    num_classes: Optional[int] = None,
) -> List[dict]:
    """Dataset dicts of an LVIS json with the annotations of ``removed`` frequencies dropped.

    Args:
        json_file: an LVIS json (e.g. lvis_v1_train.json).
        image_root: the COCO image folder holding ``train2017/`` and ``val2017/`` (LVIS v1
            images are named by their COCO url), or the folder ``file_name`` entries are
            relative to.
        removed: frequency groups whose annotations are dropped (``()``: keep everything).
        num_classes: expected number of categories (the registered ``thing_classes``).

    Returns:
        Detectron2 dicts, sorted by image id: contiguous ``category_id`` = index of the dataset
        id among the json's sorted category ids (id - 1 for LVIS v1), XYWH_ABS boxes, polygons
        when present, and the image's ``neg_category_ids`` / ``not_exhaustive_category_ids``
        (dataset ids), as Detectron2's ``load_lvis_json`` returns them.
    """
    json_file = PathManager.get_local_path(json_file)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"LVIS json file not found: {json_file}")
    with open(json_file) as f:
        lvis = json.load(f)
    _check_lvis_dict(lvis, json_file, need_frequency=bool(removed))
    if removed:
        lvis = build_lvis_norare_json(lvis, removed)
    cat_ids = sorted(c["id"] for c in lvis["categories"])
    if num_classes is not None and len(cat_ids) != num_classes:
        raise ValueError(
            f"{json_file} has {len(cat_ids)} categories but the dataset is registered with "
            f"{num_classes} thing_classes; pass thing_classes= (the json's names in id order) to "
            "register_lvis_ovd for a vocabulary other than LVIS v1's 1203 classes"
        )
    contiguous = {cid: i for i, cid in enumerate(cat_ids)}
    anns_by_image = defaultdict(list)
    for ann in lvis["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)

    dataset_dicts = []
    for image in sorted(lvis["images"], key=lambda im: im["id"]):
        objs = []
        for ann in anns_by_image[image["id"]]:
            obj = {
                "bbox": ann["bbox"],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": contiguous[ann["category_id"]],
            }
            polygons = _valid_polygons(ann.get("segmentation"))
            if polygons is not None:
                obj["segmentation"] = polygons
            objs.append(obj)
        dataset_dicts.append(
            {
                "file_name": _image_path(image_root, image),
                "height": image["height"],
                "width": image["width"],
                "image_id": image["id"],
                "neg_category_ids": image.get("neg_category_ids", []),
                "not_exhaustive_category_ids": image.get("not_exhaustive_category_ids", []),
                "annotations": objs,
            }
        )
    logger.info(
        f"Loaded {len(dataset_dicts)} images, {len(lvis['annotations'])} annotations from "
        f"{json_file} (frequencies removed: {list(removed) or 'none'})"
    )
    return dataset_dicts


def register_lvis_ovd(
    name: str,
    json_file: str,
    image_root: str,
    split: str = "train",
    thing_classes: Optional[List[str]] = None,
) -> None:
    """Register an LVIS json as an open-vocabulary dataset (read lazily, on first use).

    Args:
        name: dataset name, e.g. "my_lvis_train_norare".
        json_file: the LVIS json.
        image_root: see :func:`load_lvis_ovd_json`.
        split: "train": rare annotations removed (:func:`build_lvis_norare_json`); "val": all
            annotations kept, with ``json_file`` metadata so ``TEST.EVALUATOR lvis`` evaluates
            against the json (its negative / not-exhaustive lists and frequencies).
        thing_classes: class names in category-id order; default LVIS v1's 1203 (Detectron2's
            list). The json must have that many categories.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' (rare removed) or 'val', got {split!r}")
    if thing_classes is None:
        thing_classes = get_lvis_instances_meta("lvis_v1")["thing_classes"]
    thing_classes = list(thing_classes)
    if name in DatasetCatalog.list():
        raise ValueError(
            f"Dataset {name!r} is already registered. Use another name, or call "
            f"DatasetCatalog.remove({name!r}) and MetadataCatalog.remove({name!r}) first."
        )
    removed = ("r",) if split == "train" else ()
    num_classes = len(thing_classes)
    DatasetCatalog.register(
        name, lambda: load_lvis_ovd_json(json_file, image_root, removed, num_classes)
    )
    # The train split has no "json_file": the file on disk still holds the rare annotations, so it
    # must not serve as ground truth for this dataset.
    files = {"json_file": json_file} if split == "val" else {"lvis_json_file": json_file}
    MetadataCatalog.get(name).set(
        image_root=image_root,
        thing_classes=thing_classes,
        evaluator_type="lvis",
        lvis_removed_frequencies=list(removed),
        **files,
    )


def register_all_lvis_ovd(root: str) -> None:
    """Register the builtin open-vocabulary LVIS splits (``lvis_v1_train_norare``) under root."""
    for name, (json_file, image_root) in _BUILTIN_LVIS_OVD.items():
        if name in DatasetCatalog.list():
            continue
        register_lvis_ovd(
            name, os.path.join(root, json_file), os.path.join(root, image_root), split="train"
        )


def _builtin_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


if __name__.endswith(".lvis_split"):  # as Detectron2's builtin.py: register on import
    register_all_lvis_ovd(_builtin_root())
