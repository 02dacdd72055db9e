# Copyright (c) kd_detr contributors.
"""``TRAIN_MAPPER_REGISTRY``: training dataset mappers chosen by the config, and the train / test
loaders kd_detr's trainers use (every mapper wrapped by :class:`BadImagePolicy`)."""
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader

from ..utils import NamedRegistry
from .bad_images import BadImagePolicy
from .detr_augmentation import build_detr_train_augmentation

__all__ = [
    "TRAIN_MAPPER_REGISTRY",
    "build_test_loader",
    "build_train_loader",
    "build_train_mapper",
]

TRAIN_MAPPER_REGISTRY = NamedRegistry("TRAIN_MAPPER")
TRAIN_MAPPER_REGISTRY.__doc__ = """
Training dataset mappers that replace Detectron2's ``DatasetMapper(cfg, is_train=True)`` when the
config asks for them. Each entry is a function ``build(cfg)`` returning a mapper when its config
switch is on, else None (``DETR_CROP`` here: DETR's resize-then-crop augmentation; ``kd_detr.ov``
adds ``VILD_REGIONS``: images with their cached CLIP regions). At most one may apply to a config.
"""


@TRAIN_MAPPER_REGISTRY.register(name="DETR_CROP")
def build_detr_crop_mapper(cfg):
    """``DatasetMapper`` with DETR's crop augmentation when ``INPUT.DETR_CROP.ENABLED``."""
    if not cfg.INPUT.DETR_CROP.ENABLED:
        return None
    return DatasetMapper(cfg, is_train=True, augmentations=build_detr_train_augmentation(cfg))


def build_train_mapper(cfg):
    """The training mapper of ``cfg``: the one registered mapper whose switch is on, else
    Detectron2's ``DatasetMapper(cfg, True)``, wrapped by the ``DATALOADER.ON_BAD_IMAGE`` policy.

    Raises:
        ValueError: when the switches of two registered mappers are on.
    """
    built = {}
    for name, build in TRAIN_MAPPER_REGISTRY:
        mapper = build(cfg)
        if mapper is not None:
            built[name] = mapper
    if len(built) > 1:
        raise ValueError(
            f"The config turns on several training mappers ({', '.join(built)}); they cannot be "
            "combined: turn all but one off."
        )
    mapper = next(iter(built.values())) if built else DatasetMapper(cfg, is_train=True)
    return BadImagePolicy.from_config(cfg, mapper)


def build_train_loader(cfg):
    """Detectron2's training loader with :func:`build_train_mapper`'s mapper."""
    return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))


def build_test_loader(cfg, dataset_name: str):
    """Detectron2's test loader whose mapper follows the ``DATALOADER.ON_BAD_IMAGE`` policy."""
    mapper = BadImagePolicy.from_config(cfg, DatasetMapper(cfg, is_train=False))
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
