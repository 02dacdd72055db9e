# Copyright (c) kd_detr contributors.
"""COCO-OVD splits registered from ``cfg.DATASETS.COCO_OVD`` (the ``COCO_OVD`` source of
``DATASET_SOURCE_REGISTRY``); paths may start with ``$KD_DETR_SHARED_DATA``."""
import os
from typing import List

from ..data.datasets import DATASET_SOURCE_REGISTRY
from ..utils import SHARED_DATA_VAR, cache_root, expand_data_path, shared_data_root
from .coco_ovd import register_coco_ovd

__all__ = ["register_coco_ovd_from_config"]


def _cache_dir(cfg) -> str:
    root = cfg.DATASETS.get("COCO_OVD_CACHE_DIR", "")
    return os.path.abspath(expand_data_path(root)) if root else cache_root("coco_ovd")


@DATASET_SOURCE_REGISTRY.register(name="COCO_OVD")
def register_coco_ovd_from_config(cfg) -> List[str]:
    """Register every ``cfg.DATASETS.COCO_OVD`` entry
    ("name,instances.json,image_root,train|val[,65|80]"); returns the names.

    Raises:
        ValueError: for a malformed entry (naming it and the expected form).
        FileNotFoundError: for a missing json or image folder (naming ``KD_DETR_SHARED_DATA``).
    """
    names = []
    for entry in cfg.DATASETS.get("COCO_OVD", []):
        fields = [f.strip() for f in str(entry).split(",")]
        if len(fields) not in (4, 5) or not all(fields) or fields[3] not in ("train", "val"):
            raise ValueError(
                f"Malformed cfg.DATASETS.COCO_OVD entry {entry!r}: expected "
                "'name,path/to/instances.json,path/to/image_root,train|val[,65|80]'"
            )
        name, json_file, image_root, split = fields[:4]
        vocabulary = int(fields[4]) if len(fields) == 5 else 65
        json_file, image_root = expand_data_path(json_file), expand_data_path(image_root)
        for path, what in ((json_file, "json"), (image_root, "image folder")):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"COCO-OVD dataset {name!r}: {what} not found: {path}. Set "
                    f"{SHARED_DATA_VAR} to the folder holding the shared data (now "
                    f"{shared_data_root()}) or put absolute paths in cfg.DATASETS.COCO_OVD"
                )
        register_coco_ovd(name, json_file, image_root, split, _cache_dir(cfg), vocabulary)
        names.append(name)
    return names
