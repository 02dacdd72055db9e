# Copyright (c) kd_detr contributors.
"""``TRAIN_LOADER_REGISTRY``: training data loaders chosen by the config, and
``build_train_loader`` (what ``Trainer.build_train_loader`` calls)."""
from detectron2.data import DatasetMapper, build_detection_train_loader

from ..utils import NamedRegistry
from .detr_augmentation import build_detr_train_augmentation

__all__ = ["TRAIN_LOADER_REGISTRY", "build_train_loader"]

TRAIN_LOADER_REGISTRY = NamedRegistry("TRAIN_LOADER")
TRAIN_LOADER_REGISTRY.__doc__ = """
Training loaders that replace Detectron2's default one when the config asks for them. Each entry
is a function ``build(cfg)`` returning a data loader when its config switch is on, else None
(``DETR_CROP`` here: DETR's resize-then-crop augmentation; ``kd_detr.ov`` adds ``VILD_REGIONS``,
images with their cached CLIP regions). At most one may apply to a config.
"""


@TRAIN_LOADER_REGISTRY.register(name="DETR_CROP")
def build_detr_crop_train_loader(cfg):
    """Detectron2's loader with DETR's crop augmentation when ``INPUT.DETR_CROP.ENABLED``."""
    if not cfg.INPUT.DETR_CROP.ENABLED:
        return None
    mapper = DatasetMapper(cfg, is_train=True, augmentations=build_detr_train_augmentation(cfg))
    return build_detection_train_loader(cfg, mapper=mapper)


def build_train_loader(cfg):
    """The training loader of ``cfg``: the one registered loader whose switch is on, else
    Detectron2's ``build_detection_train_loader(cfg)``.

    Raises:
        ValueError: when the switches of two registered loaders are on.
    """
    built = {}
    for name, build in TRAIN_LOADER_REGISTRY:
        loader = build(cfg)
        if loader is not None:
            built[name] = loader
    if len(built) > 1:
        raise ValueError(
            f"The config turns on several training loaders ({', '.join(built)}); they cannot be "
            "combined: turn all but one off."
        )
    if built:
        return next(iter(built.values()))
    return build_detection_train_loader(cfg)
