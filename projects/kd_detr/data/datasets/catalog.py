# Copyright (c) kd_detr contributors.
"""Helpers shared by the dataset registrations: absolute paths and the "same name, same data"
rule of the catalogs."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["absolute_path", "already_registered"]


def absolute_path(path) -> str:
    """``path`` with ``~`` expanded, made absolute."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def already_registered(name: str, **expected) -> bool:
    """Whether ``name`` is registered with exactly these metadata values.

    Returns False when ``name`` is not registered; raises ValueError when it is registered with
    other values, so that a name never silently points at two different datasets.
    """
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    found = {key: meta.get(key, None) for key in expected}
    if found == expected:
        return True
    raise ValueError(
        f"Dataset {name!r} is already registered with {found}, not {expected}. Use another name, "
        f"or call DatasetCatalog.remove({name!r}) and MetadataCatalog.remove({name!r}) first."
    )
