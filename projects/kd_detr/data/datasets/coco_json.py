# Copyright (c) kd_detr contributors.
"""Register COCO-format json datasets (also from ``cfg.DATASETS.COCO_JSON``).

``register_coco_json("my_train", "ann/train.json", "images/")`` is all a custom COCO-format
dataset needs. Compared with Detectron2's ``register_coco_instances`` it checks its inputs (clear
errors for a missing file or a json lacking a required key) and drops boxes of zero width or
height with one warning per file instead of letting them reach the model.
"""
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ...utils import expand_data_path
from .catalog import absolute_path, already_registered
from .coco_checks import box_problems, read_coco_categories, unknown_category_annotations
from .registry import DATASET_SOURCE_REGISTRY, split_config_entry

__all__ = ["register_coco_json", "load_coco_json_checked", "register_coco_json_from_config"]

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")


def _check_coco_json(json_file):
    """Raise a clear error when ``json_file`` is not valid json with the COCO top-level keys."""
    try:
        with open(json_file, "r") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file} is not valid json: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"{json_file} is not a COCO-format json: its top level is not an object")
    missing = [key for key in _REQUIRED_KEYS if key not in content]
    if missing:
        raise ValueError(
            f"{json_file} is not a COCO-format json: it lacks the key(s) "
            f"{', '.join(repr(k) for k in missing)} (found keys: {sorted(content)})"
        )
    for key in _REQUIRED_KEYS:
        if not isinstance(content[key], list):
            raise ValueError(f"{json_file}: {key!r} must be a list, got {type(content[key])}")
    if not content["categories"]:
        raise ValueError(f"{json_file}: 'categories' is empty")


def _drop_bad_boxes(dataset_dicts, json_file):
    """Drop boxes with a non-finite coordinate or a zero / negative side (one warning per kind,
    naming the file and the count); warn about boxes extending beyond their image."""
    non_finite = degenerate = outside = 0
    for record in dataset_dicts:
        kept, bad_values, bad_sides, beyond = box_problems(record)
        record["annotations"] = kept
        non_finite, degenerate, outside = (
            non_finite + bad_values, degenerate + bad_sides, outside + beyond
        )
    if non_finite:
        logger.warning(
            f"{json_file}: dropped {non_finite} annotation(s) whose box has a NaN or infinite "
            "coordinate."
        )
    if degenerate:
        logger.warning(
            f"{json_file}: dropped {degenerate} annotation(s) whose box has zero or negative "
            "width or height."
        )
    if outside:
        logger.warning(
            f"{json_file}: {outside} box(es) extend beyond their image; training clips them, "
            "evaluation counts them as ground truth as they are."
        )
    return dataset_dicts


def load_coco_json_checked(json_file, image_root, dataset_name=None):
    """Detectron2's ``load_coco_json`` with input checks and degenerate boxes dropped.

    Crowd annotations (``iscrowd=1``) are kept: Detectron2's ``DatasetMapper`` leaves them out of
    the training targets and COCO evaluation uses them as "ignore" regions.

    Args:
        json_file (str): COCO-format json with "images", "annotations" and "categories".
        image_root (str): directory the json's ``file_name`` entries are relative to.
        dataset_name (str or None): when given, sets ``thing_classes`` and
            ``thing_dataset_id_to_contiguous_id`` in its metadata (as ``load_coco_json`` does).

    Returns:
        list[dict]: dataset dicts in Detectron2's standard format.
    """
    json_file = absolute_path(json_file)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file not found: {json_file}")
    try:
        dataset_dicts = load_coco_json(json_file, image_root, dataset_name)
    except KeyError as e:
        unknown = unknown_category_annotations(json_file)
        if not unknown:
            raise
        shown = ", ".join(f"annotation {a} (category_id {c})" for a, c in unknown[:5])
        raise ValueError(
            f"{json_file}: {len(unknown)} annotation(s) name a category_id missing from "
            f"'categories': {shown}{', ...' if len(unknown) > 5 else ''}. Add the categories or "
            "remove the annotations."
        ) from e
    except Exception:
        _check_coco_json(json_file)  # a clearer error than pycocotools' when the json is malformed
        raise
    # pycocotools accepts a json without "images" or "annotations" and returns nothing for them:
    # only then parse the file a second time, to name what is missing.
    if not dataset_dicts or not any(record["annotations"] for record in dataset_dicts):
        _check_coco_json(json_file)
    return _drop_bad_boxes(dataset_dicts, json_file)


def register_coco_json(name, json_file, image_root, *, metadata=None):
    """Register a COCO-format json dataset under ``name``: its categories are read now
    (``thing_classes``), the rest of the json lazily, on first use.

    Registering the same name again with the same files is a no-op; with other files, an error.
    Images without annotations are kept; whether training drops them is decided by
    ``cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS``, as for any Detectron2 dataset.

    Args:
        name (str): dataset name, e.g. "my_dataset_train".
        json_file (str): COCO-format json file.
        image_root (str): directory the json's ``file_name`` entries are relative to.
        metadata (dict or None): extra metadata, e.g. ``{"thing_colors": [...]}``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Dataset name must be a non-empty string, got {name!r}")
    json_file, image_root = absolute_path(json_file), absolute_path(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file for dataset {name!r} not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Image directory for dataset {name!r} not found: {image_root}")
    if already_registered(name, json_file=json_file, image_root=image_root):
        return
    # The classes are read now (the json's "categories" only), so class-count checks work
    # before the dataset is loaded.
    classes, id_map = read_coco_categories(json_file)
    DatasetCatalog.register(name, lambda: load_coco_json_checked(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=classes,
        thing_dataset_id_to_contiguous_id=id_map,
        **(metadata or {}),
    )


@DATASET_SOURCE_REGISTRY.register(name="COCO_JSON")
def register_coco_json_from_config(cfg):
    """Register every ``cfg.DATASETS.COCO_JSON`` entry ("name,path/to/instances.json,
    path/to/image_root"; paths may start with ``$KD_DETR_SHARED_DATA``); returns the names."""
    names = []
    for entry in cfg.DATASETS.get("COCO_JSON", []):
        name, json_file, image_root = split_config_entry(
            entry, "COCO_JSON", 3, "name,path/to/instances.json,path/to/image_root"
        )
        register_coco_json(name, expand_data_path(json_file), expand_data_path(image_root))
        names.append(name)
    return names
