# Copyright (c) kd_detr contributors.
"""Class-incremental few-shot splits (Incremental-DETR, Dong et al., AAAI 2023), the
``INCREMENTAL`` dataset source.

From a registered training set and test set, ``DATASETS.INCREMENTAL`` registers three datasets:

* ``<NAME>_base_train``: the base-class training set. As in the official data preparation
  (``prepare_coco_inc.py``), every image with at least one base-class annotation is kept and its
  novel-class annotations are dropped (the novel objects become background); images without a
  base annotation are dropped.
* ``<NAME>_novel_train``: the few-shot set of the incremental step, ``SHOTS`` images per novel
  class. For each novel class (in id order) ``SHOTS`` images are drawn without replacement,
  seeded by ``SEED``, among the images that show the class and were not drawn for an earlier
  class, so the per-class sets are disjoint; an image keeps the annotations of the class it was
  drawn for only (the base data, and with it base labels, is unavailable in the incremental
  step; other novel classes of the image are not labelled, as in per-class k-shot files).
* ``<NAME>_val``: the test set with every class, whose metadata names the base and novel classes
  (``incremental_base_classes`` / ``incremental_novel_classes``, contiguous ids) for the
  ``coco_incremental`` evaluator.

Classes keep the source's contiguous ids and names, so base model and incremental model share
one class list (the base model's novel logits are simply never trained positive).
The defaults make the demo split ``kd_demo_incremental``: the demo shapes circle, square and
triangle are the base classes, cross the novel one, 10 shots.
"""
import functools
import logging
import random
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .registry import DATASET_SOURCE_REGISTRY

__all__ = [
    "base_training_set",
    "check_base_classes",
    "check_class_ids",
    "few_shot_novel_set",
    "register_incremental_split",
]

logger = logging.getLogger(__name__)

_COPIED_METADATA = ("thing_classes", "thing_dataset_id_to_contiguous_id", "thing_colors")


def check_class_ids(
    class_ids: Sequence[int], num_classes: Optional[int], key: str, owner: str = "the dataset"
) -> List[int]:
    """Sorted class ids after checking that each is in ``[0, num_classes)`` (only ``>= 0`` when
    ``num_classes`` is None) and listed once.

    Raises:
        ValueError: naming ``key``, the bad ids and ``owner``'s class count.
    """
    ids = [int(c) for c in class_ids]
    bad = [c for c in ids if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        top = num_classes - 1 if num_classes else "?"
        raise ValueError(
            f"{key} {ids} has ids {bad} outside [0, {top}] ({owner} has {num_classes} classes): "
            f"use contiguous 0-based class ids."
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{key} {ids} repeats a class id: list each base class once.")
    return sorted(ids)


def check_base_classes(base_classes: Sequence[int], num_classes: int, key: str) -> List[int]:
    """Sorted base class ids of a split: :func:`check_class_ids`, not empty, and at least one
    class left as novel.

    Raises:
        ValueError: empty, repeated or out-of-range ids, or no novel class left; naming ``key``.
    """
    if not list(base_classes):
        raise ValueError(f"{key} is empty: list the base classes' contiguous ids (0-based).")
    base = check_class_ids(base_classes, num_classes, key)
    if len(base) == num_classes:
        raise ValueError(f"{key} {base} lists every class: leave at least one novel class.")
    return base


def _class_ids(record: Dict) -> List[int]:
    return [int(a["category_id"]) for a in record.get("annotations", [])]


def base_training_set(dataset_dicts: Sequence[Dict], base_classes: Sequence[int]) -> List[Dict]:
    """Images with a base annotation, their novel annotations dropped (new dicts)."""
    base = set(int(c) for c in base_classes)
    out = []
    for record in dataset_dicts:
        kept = [a for a in record.get("annotations", []) if int(a["category_id"]) in base]
        if kept:
            out.append(dict(record, annotations=kept))
    return out


def few_shot_novel_set(
    dataset_dicts: Sequence[Dict],
    novel_classes: Sequence[int],
    shots: int,
    seed: int,
    class_names: Sequence[str] = (),
) -> List[Dict]:
    """``shots`` disjoint images per novel class, each with that class's annotations only.

    Raises:
        ValueError: a novel class shows in fewer than ``shots`` images not yet drawn, naming
            ``DATASETS.INCREMENTAL.SHOTS``, the class and the count.
    """
    if shots < 1:
        raise ValueError(f"DATASETS.INCREMENTAL.SHOTS must be >= 1, got {shots}.")
    rng = random.Random(seed)
    taken, out = set(), []
    order = sorted(range(len(dataset_dicts)), key=lambda i: dataset_dicts[i]["image_id"])
    for cls in sorted(int(c) for c in novel_classes):
        candidates = [i for i in order if i not in taken and cls in _class_ids(dataset_dicts[i])]
        if len(candidates) < shots:
            name = class_names[cls] if cls < len(class_names) else str(cls)
            raise ValueError(
                f"DATASETS.INCREMENTAL.SHOTS {shots}: novel class {cls} ({name!r}) shows in only "
                f"{len(candidates)} training images not drawn for an earlier novel class; lower "
                f"DATASETS.INCREMENTAL.SHOTS to at most {len(candidates)} or use a larger "
                "training set."
            )
        for i in sorted(rng.sample(candidates, shots), key=lambda i: dataset_dicts[i]["image_id"]):
            taken.add(i)
            record = dataset_dicts[i]
            kept = [a for a in record["annotations"] if int(a["category_id"]) == cls]
            out.append(dict(record, annotations=kept))
    return out


def _split(which: str, source: str, base: Tuple[int, ...], shots: int, seed: int) -> List[Dict]:
    dicts = DatasetCatalog.get(source)
    if which == "base":
        return base_training_set(dicts, base)
    names = MetadataCatalog.get(source).get("thing_classes", [])
    novel = [c for c in range(len(names)) if c not in base]
    return few_shot_novel_set(dicts, novel, shots, seed, names)


def _source_classes(source: str, key: str) -> List[str]:
    if source not in DatasetCatalog.list():
        raise ValueError(
            f"{key} {source!r} is not a registered dataset: name a registered dataset (e.g. "
            "'kd_demo_train', or a DATASETS.COCO_JSON / VOC entry)."
        )
    classes = MetadataCatalog.get(source).get("thing_classes", None)
    if not classes:
        raise ValueError(f"{key} {source!r} has no 'thing_classes' metadata.")
    return list(classes)


def register_incremental_split(
    name: str,
    train_source: str,
    test_source: str,
    base_classes: Sequence[int],
    shots: int,
    seed: int,
) -> List[str]:
    """(Re-)register ``<name>_base_train``, ``<name>_novel_train`` and ``<name>_val`` (see the
    module doc); the training sets are computed lazily, when first loaded.

    Raises:
        ValueError: unregistered sources, bad base classes or shots (naming the key).
    """
    classes = _source_classes(train_source, "DATASETS.INCREMENTAL.TRAIN_SOURCE")
    test_classes = _source_classes(test_source, "DATASETS.INCREMENTAL.TEST_SOURCE")
    if test_classes != classes:
        raise ValueError(
            f"DATASETS.INCREMENTAL: TRAIN_SOURCE {train_source!r} and TEST_SOURCE {test_source!r} "
            f"have different classes ({classes} vs {test_classes})."
        )
    if int(shots) < 1:
        raise ValueError(f"DATASETS.INCREMENTAL.SHOTS must be >= 1, got {shots}.")
    key = "DATASETS.INCREMENTAL.BASE_CLASSES"
    base = tuple(check_base_classes(base_classes, len(classes), key))
    novel = [c for c in range(len(classes)) if c not in base]
    split = {"incremental_base_classes": list(base), "incremental_novel_classes": novel}
    src_meta = MetadataCatalog.get(train_source)
    copied = {k: src_meta.get(k) for k in _COPIED_METADATA if src_meta.get(k, None) is not None}
    names = {
        "base": f"{name}_base_train",
        "novel": f"{name}_novel_train",
        "val": f"{name}_val",
    }
    for which, dataset in names.items():
        if dataset in DatasetCatalog.list():
            DatasetCatalog.remove(dataset)
        if dataset in MetadataCatalog.list():
            MetadataCatalog.remove(dataset)
        if which == "val":
            DatasetCatalog.register(dataset, lambda src=test_source: DatasetCatalog.get(src))
            test_meta = MetadataCatalog.get(test_source).as_dict()
            test_meta.pop("name", None)
            MetadataCatalog.get(dataset).set(**test_meta, **split)
        else:
            loader = functools.partial(_split, which, train_source, base, int(shots), int(seed))
            DatasetCatalog.register(dataset, loader)
            MetadataCatalog.get(dataset).set(
                **copied, **split, incremental_shots=int(shots), incremental_seed=int(seed)
            )
    return list(names.values())


@DATASET_SOURCE_REGISTRY.register(name="INCREMENTAL")
def register_incremental_from_config(cfg):
    """Register the split of ``cfg.DATASETS.INCREMENTAL`` (re-registered for the config's
    settings); returns its names, except for the built-in demo split's."""
    c = cfg.DATASETS.get("INCREMENTAL")
    if c is None or not c.NAME:
        return []
    names = register_incremental_split(
        c.NAME, c.TRAIN_SOURCE, c.TEST_SOURCE, c.BASE_CLASSES, c.SHOTS, c.SEED
    )
    return [] if c.NAME == "kd_demo_incremental" else names


# The demo split with the defaults of DATASETS.INCREMENTAL (after the demo datasets).
register_incremental_split("kd_demo_incremental", "kd_demo_train", "kd_demo_val", (0, 1, 2), 10, 0)
