# Copyright (c) kd_detr contributors.
"""Registry of encoder-decoder transformers used by kd_detr's meta-architectures."""
from detectron2.utils.registry import Registry

__all__ = ["TRANSFORMER_REGISTRY", "build_transformer"]

TRANSFORMER_REGISTRY = Registry("KD_DETR_TRANSFORMER")
TRANSFORMER_REGISTRY.__doc__ = """
Registry for DETR-family encoder-decoder transformers.

A registered class is called as ``cls(cfg)``, so it should be ``@configurable`` with a
``from_config(cls, cfg)`` reading its own config namespace. It must expose ``d_model`` and return
every decoder layer's output, shaped (num_layers, B, num_queries, d_model).
"""


def build_transformer(cfg, name: str):
    """Build the transformer registered as ``name`` from ``cfg``."""
    return TRANSFORMER_REGISTRY.get(name)(cfg)
