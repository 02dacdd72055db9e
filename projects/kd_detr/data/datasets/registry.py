# Copyright (c) kd_detr contributors.
"""``DATASET_SOURCE_REGISTRY``: datasets registered from a config, and ``register_from_config``."""
from typing import List, Sequence

from ...utils import NamedRegistry

__all__ = ["DATASET_SOURCE_REGISTRY", "register_from_config", "split_config_entry"]

DATASET_SOURCE_REGISTRY = NamedRegistry("DATASET_SOURCE")
DATASET_SOURCE_REGISTRY.__doc__ = """
Config-driven dataset registrations, one per source of datasets (``KD_DEMO``, ``COCO_JSON``,
``VOC`` here; ``COCO_OVD`` from ``kd_detr.ov``). Each is a function ``register(cfg) -> list[str]``
that registers the datasets its config keys list (``cfg.DATASETS.<SOURCE>``) with Detectron2's
catalogs and returns their names. It must be idempotent: a name already registered with the same
settings is skipped, with other settings an error. Built-in names a source re-registers for the
config's settings (the demo datasets) are not returned.
"""


def register_from_config(cfg, skip: Sequence[str] = ()) -> List[str]:
    """Register every dataset the config lists, calling each source of
    ``DATASET_SOURCE_REGISTRY`` in registration order (except those named in ``skip``); calling
    it twice is harmless.

    Returns:
        list[str]: the names of all datasets listed in the config.
    """
    names = []
    for name, register in DATASET_SOURCE_REGISTRY:
        if name not in skip:
            names += register(cfg)
    return names


def split_config_entry(entry, key: str, num_fields, example: str) -> List[str]:
    """The comma-separated fields of one ``cfg.DATASETS.<key>`` entry, stripped.

    Args:
        num_fields (int or tuple[int]): accepted field counts.

    Raises:
        ValueError: naming the entry and the expected form.
    """
    counts = (num_fields,) if isinstance(num_fields, int) else tuple(num_fields)
    fields = [field.strip() for field in str(entry).split(",")]
    if len(fields) not in counts or not all(fields):
        raise ValueError(
            f"Malformed cfg.DATASETS.{key} entry {entry!r}: expected "
            f"{' or '.join(str(c) for c in counts)} non-empty comma-separated fields, like "
            f"{example!r}"
        )
    return fields
