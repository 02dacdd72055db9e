# Copyright (c) kd_detr contributors.
"""Check a model's class count against its training dataset's metadata."""
from typing import Optional

from detectron2.data import MetadataCatalog

__all__ = ["check_num_classes", "num_classes", "num_classes_key", "uses_open_vocabulary"]

# Config key holding the class count of each Detectron2 meta-architecture family.
_NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "ViLDRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
}


def num_classes_key(cfg) -> Optional[str]:
    """The config key of the class count for cfg.MODEL.META_ARCHITECTURE (None if unknown)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in _NUM_CLASSES_KEYS:
        return _NUM_CLASSES_KEYS[arch]
    if "DETR" in cfg.MODEL and (arch.upper().endswith("DETR") or arch in ("DINO", "DFINE")):
        return "MODEL.DETR.NUM_CLASSES"
    return None


def num_classes(cfg) -> Optional[int]:
    """The model's class count (the value of :func:`num_classes_key`; None if unknown)."""
    key = num_classes_key(cfg)
    if key is None:
        return None
    value = cfg
    for part in key.split("."):
        value = value[part]
    return int(value)


def uses_open_vocabulary(cfg) -> bool:
    """True when the model classifies against text embeddings (``MODEL.OV.TEXT_EMBEDDINGS``): its
    test vocabulary may differ from the training classes."""
    ov = cfg.MODEL.get("OV")
    return bool(ov is not None and ov.get("TEXT_EMBEDDINGS"))


def check_num_classes(cfg, key: Optional[str] = None, test: bool = False):
    """Raise ValueError when the model's class count differs from ``cfg.DATASETS.TRAIN[0]``'s
    (and, with ``test``, from every ``DATASETS.TEST`` dataset's, unless the model has an open
    vocabulary: evaluating on other classes gives a meaningless AP).

    Args:
        key: dotted config key of the class count; default: the meta-architecture's.

    Datasets whose metadata has no ``thing_classes`` are not checked.
    """
    key = key or num_classes_key(cfg)
    if key is None:
        return
    datasets = list(cfg.DATASETS.TRAIN[:1])
    if test and not uses_open_vocabulary(cfg):
        datasets += [d for d in cfg.DATASETS.TEST if d not in datasets]
    value = cfg
    for part in key.split("."):
        value = value[part]
    for dataset in datasets:
        classes = MetadataCatalog.get(dataset).get("thing_classes", None)
        if classes is not None and value != len(classes):
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise ValueError(
                f"{key} is {value} but dataset '{dataset}' has {len(classes)} classes ({shown}). "
                f"Set {key} {len(classes)} in the config or on the command line, or evaluate on "
                "a dataset of the model's classes."
            )
