# Copyright (c) kd_detr contributors.
"""Check a model's class count against its training dataset's metadata."""
from typing import Optional

from detectron2.data import MetadataCatalog

__all__ = ["check_num_classes", "num_classes_key"]

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


def check_num_classes(cfg, key: Optional[str] = None):
    """Raise ValueError when the model's class count differs from ``cfg.DATASETS.TRAIN[0]``'s.

    Args:
        key: dotted config key of the class count; default: the meta-architecture's.

    Does nothing when no training dataset is set or its metadata has no ``thing_classes``.
    """
    key = key or num_classes_key(cfg)
    if key is None or not cfg.DATASETS.TRAIN:
        return
    dataset = cfg.DATASETS.TRAIN[0]
    classes = MetadataCatalog.get(dataset).get("thing_classes", None)
    if classes is None:
        return
    value = cfg
    for part in key.split("."):
        value = value[part]
    if value != len(classes):
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise ValueError(
            f"{key} is {value} but dataset '{dataset}' has {len(classes)} classes ({shown}). "
            f"Set {key} {len(classes)} in the config or on the command line."
        )
