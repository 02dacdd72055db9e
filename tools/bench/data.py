# Copyright (c) kd_detr contributors.
"""The bench's dataset switch: ``--train`` / ``--test`` as a registered dataset name, a COCO json
(+ image folder) or a Pascal-VOC folder (+ split and class names).

A :class:`DataSwitch` turns the pair into config overrides (``DATASETS.TRAIN`` / ``TEST``,
``DATASETS.COCO_JSON`` / ``VOC`` entries and the model's class-count key) that every run gets:
teacher, students, and the KD runs' teacher (through ``MODEL.KD.TEACHER.OPTS``).
"""
import hashlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional

from .arms import BenchError

__all__ = ["Dataset", "DataSwitch", "resolve_dataset", "split_classes"]


@dataclass
class Dataset:
    """A resolved dataset: its registered name, the config entry registering it (or None for a
    name Detectron2 / kd_detr registers itself) and its class names."""

    name: str
    classes: List[str]
    key: Optional[str] = None  # "COCO_JSON" or "VOC"
    entry: Optional[str] = None
    source: str = ""


def split_classes(text):
    """Class names from "A;B;C" or "A,B,C"."""
    if not text:
        return []
    sep = ";" if ";" in text else ","
    return [c.strip() for c in text.split(sep)]


def _coco_classes(json_file, role):
    try:
        with open(json_file) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"--{role} {json_file}: cannot read it as json ({e})") from e
    cats = content.get("categories") if isinstance(content, dict) else None
    if not cats:
        raise BenchError(f"--{role} {json_file}: not a COCO json (no 'categories')")
    # load_coco_json orders thing_classes by category id.
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def _short_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def resolve_dataset(value, role, *, images="", split="", classes=(), catalog=()):
    """Resolve one ``--train`` / ``--test`` value.

    Args:
        value (str): a registered dataset name, a COCO json file or a VOC folder.
        role (str): "train" or "test" (names the flag in errors).
        images (str): image folder of a COCO json (default: the json's folder's ``images`` or
            the json's folder).
        split (str): VOC split (``ImageSets/Main/<split>.txt``).
        classes (list[str]): VOC class names.
        catalog (dict): registered name -> class names (or None when unknown).

    Raises:
        BenchError: the value resolves to nothing, or its inputs are incomplete.
    """
    from kd_detr.utils import expand_data_path  # kd_detr only when a dataset is resolved

    if value in catalog:
        if not catalog[value]:
            raise BenchError(
                f"--{role} {value}: the dataset has no class names ('thing_classes' metadata); "
                "give it as a COCO json or a VOC folder with --classes instead"
            )
        return Dataset(value, list(catalog[value]), source=f"registered dataset {value}")
    path = os.path.abspath(expand_data_path(value))
    if os.path.isfile(path) and path.endswith(".json"):
        if not images:
            below = os.path.join(os.path.dirname(path), "images")
            images = below if os.path.isdir(below) else os.path.dirname(path)
        images = os.path.abspath(expand_data_path(images))
        if not os.path.isdir(images):
            raise BenchError(f"--{role}-images {images}: image folder not found")
        names = _coco_classes(path, role)
        entry = f"{path},{images}"
        name = f"bench_{role}_{_short_hash(entry)}"
        return Dataset(name, names, "COCO_JSON", f"{name},{entry}", f"COCO json {path}")
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "ImageSets", "Main")):
        split_file = os.path.join(path, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(split_file):
            found = sorted(f[:-4] for f in os.listdir(os.path.dirname(split_file)))
            raise BenchError(
                f"--{role} {value}: VOC split {split!r} not found ({split_file}); set "
                f"--{role}-split to one of {found}"
            )
        classes = list(classes)
        if not classes:
            raise BenchError(
                f"--{role} {value} is a VOC folder: give its class names with --classes "
                "'name1;name2;...' (in the order of the model's class ids)"
            )
        if not all(classes) or len(set(classes)) != len(classes) or any("," in c for c in classes):
            raise BenchError(f"--classes: names must be non-empty and unique, got {classes}")
        entry = f"{path},{split},{';'.join(classes)}"
        name = f"bench_{role}_{_short_hash(entry)}"
        return Dataset(name, classes, "VOC", f"{name},{entry}", f"VOC {path} ({split})")
    own = sorted(n for n in catalog if n.startswith(("kd_", "bench_", "coco_2017", "voc_2007")))
    shown = ", ".join(own[:6])
    where = f" (it expands to {path})" if path != os.path.abspath(value) else ""
    raise BenchError(
        f"--{role} {value!r} does not resolve{where}: it is not a registered dataset name (e.g. "
        f"{shown}, or one a config registers), not a COCO json file and not a VOC folder (with "
        "ImageSets/Main). Check the path."
    )


class DataSwitch:
    """The config overrides that put every run on the same train / test datasets."""

    def __init__(self, train: Dataset, test: Dataset):
        if train.classes != test.classes:
            raise BenchError(
                f"--train and --test have different classes: {train.classes} vs {test.classes}"
            )
        self.train, self.test = train, test

    @property
    def classes(self):
        return self.train.classes

    def opts(self, num_classes_key, base_entries=None):
        """Overrides for one model: datasets, their registration entries and the class count.

        Args:
            num_classes_key (str or None): the model's class-count key (``num_classes_key``).
            base_entries (dict): the config's own ``{"COCO_JSON": [...], "VOC": [...]}``; entries
                of registered names used here are kept, the others dropped.
        """
        entries = {"COCO_JSON": [], "VOC": []}
        for key, values in (base_entries or {}).items():
            used = (self.train.name, self.test.name)
            entries[key] += [e for e in values if str(e).split(",")[0].strip() in used]
        for dataset in (self.train, self.test):
            if dataset.key and dataset.entry not in entries[dataset.key]:
                entries[dataset.key].append(dataset.entry)
        opts = [
            "DATASETS.TRAIN", repr((self.train.name,)),
            "DATASETS.TEST", repr((self.test.name,)),
            "DATASETS.COCO_JSON", repr(entries["COCO_JSON"]),
            "DATASETS.VOC", repr(entries["VOC"]),
        ]  # fmt: skip
        if num_classes_key:
            opts += [num_classes_key, str(len(self.classes))]
        return opts
