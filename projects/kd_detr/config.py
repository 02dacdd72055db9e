# Copyright (c) kd_detr contributors.
"""kd_detr's config: ``load_config`` (the one way to get a config) and ``add_kd_detr_config``.

This layer sits above ``data`` and ``evaluation`` (whose keys it adds itself) and below the
models. The layers above register their keys in :data:`CONFIG_EXTENSION_REGISTRY` (``modeling``,
``distill``, ``ov``, ``engine``, ...); ``import kd_detr`` imports them all, so every extension is
registered before any config is built.
"""
import difflib
import logging
import re

import torch

from detectron2.config import get_cfg

from .data import register_from_config
from .data.config import add_data_config
from .evaluation.config import add_evaluation_config
from .utils import NamedRegistry

__all__ = [
    "CONFIG_EXTENSION_REGISTRY",
    "UnknownConfigKeyError",
    "add_kd_detr_config",
    "load_config",
    "resolve_device",
]

logger = logging.getLogger(__name__)

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

    ``MODEL.DEVICE auto`` is resolved here (:func:`resolve_device`), so every model builder gets
    ``cuda`` or ``cpu``.

    Returns:
        CfgNode: frozen unless ``freeze`` is False.

    Raises:
        UnknownConfigKeyError: a key of the file or of ``opts`` does not exist; the message names
            the nearest existing keys.
    """
    cfg = get_cfg()
    add_kd_detr_config(cfg)
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:
        # yacs: KeyError("Non-existent config key: K") from a file, AssertionError("Non-existent
        # key: K") from the command line. Re-raised with the nearest existing keys.
        match = _UNKNOWN_KEY.search(str(e))
        if match is None:
            raise
        source = "command line" if "config key" not in str(e) else f"config file {config_file!r}"
        raise UnknownConfigKeyError(cfg, match.group(1), source) from None
    resolve_device(cfg)
    if register_datasets:
        register_from_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: ([\w.]+)")


def _flat_keys(node, prefix=""):
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_keys(value, full + ".")
        else:
            yield full


class UnknownConfigKeyError(KeyError):
    """A config key that neither Detectron2 nor kd_detr defines; the message lists the nearest
    existing keys (``difflib``), e.g. ``MODEL.KD.TEMPERATUR`` -> ``MODEL.KD.TEMPERATURE``."""

    def __init__(self, cfg, key, source="command line"):
        keys = list(_flat_keys(cfg))
        # Nearest over the whole config, then within the deepest namespace that exists (catches
        # a short or very different last part: MODEL.KD.TEMP -> MODEL.KD.TEMPERATURE).
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
        parts = key.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:depth]) + "."
            siblings = [k for k in keys if k.startswith(prefix)]
            if siblings:
                names = [k[len(prefix):] for k in siblings]
                near = difflib.get_close_matches(".".join(parts[depth:]), names, n=3, cutoff=0.5)
                close += [prefix + n for n in near if prefix + n not in close]
                break
        self.key, self.suggestions = key, close[:3]
        hint = (
            f"did you mean {', '.join(self.suggestions)}?"
            if self.suggestions
            else "no similar key exists; see the defaults with "
            "`python -c \"from kd_detr.config import load_config; print(load_config())\"`"
        )
        self.message = f"Non-existent config key: {key} (from the {source}); {hint}"
        super().__init__(self.message)

    def __str__(self):
        return self.message


def resolve_device(cfg):
    """``MODEL.DEVICE auto`` -> ``cuda`` when a CUDA GPU is present, else ``cpu`` (with a
    warning), so that every place that builds a model from this config gets a real device."""
    if str(cfg.MODEL.DEVICE).lower() != "auto":
        return cfg
    device = "cuda" if torch.cuda.is_available() else "cpu"
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    if frozen:
        cfg.freeze()
    if device == "cpu":
        logger.warning("MODEL.DEVICE auto: no CUDA GPU available, running on the CPU.")
    else:
        logger.info("MODEL.DEVICE auto: using the CUDA GPU.")
    return cfg
