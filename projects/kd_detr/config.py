# Copyright (c) kd_detr contributors.
"""kd_detr's config: ``load_config`` (the one way to get a config) and ``add_kd_detr_config``.

This layer sits above ``data`` and ``evaluation`` (whose keys it adds itself) and below the
models. The layers above register their keys in :data:`CONFIG_EXTENSION_REGISTRY` (``modeling``,
``distill``, ``ov``, ``engine``, ...); ``import kd_detr`` imports them all, so every extension is
registered before any config is built.
"""
from detectron2.config import get_cfg

from .data import register_from_config
from .data.config import add_data_config
from .evaluation.config import add_evaluation_config
from .utils import NamedRegistry

__all__ = ["CONFIG_EXTENSION_REGISTRY", "add_kd_detr_config", "load_config"]

CONFIG_EXTENSION_REGISTRY = NamedRegistry("CONFIG_EXTENSION")
CONFIG_EXTENSION_REGISTRY.__doc__ = """
Functions ``add(cfg) -> None`` that add one layer's keys to a config in place (new namespaces,
each key with a comment above it). :func:`add_kd_detr_config` calls them in registration order,
which is the import order of the layers (bottom to top), so a layer may add keys inside a
namespace created by a layer below it.
"""


def add_kd_detr_config(cfg):
    """Add every kd_detr key to a Detectron2 config (in place). Call before ``merge_from_file``."""
    add_data_config(cfg)
    add_evaluation_config(cfg)
    for _, add in CONFIG_EXTENSION_REGISTRY:
        add(cfg)


def load_config(config_file="", opts=(), freeze=True, register_datasets=True):
    """The one way to get a kd_detr config: Detectron2's defaults + kd_detr's keys + the file
    (if any) + ``opts`` (a flat ``["KEY", "VALUE", ...]`` list), with the config's datasets
    registered (every source of ``DATASET_SOURCE_REGISTRY``: demo datasets,
    ``DATASETS.COCO_JSON`` / ``VOC`` / ``COCO_OVD``, ...) unless ``register_datasets`` is False.

    Returns:
        CfgNode: frozen unless ``freeze`` is False.
    """
    cfg = get_cfg()
    add_kd_detr_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if register_datasets:
        register_from_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg
