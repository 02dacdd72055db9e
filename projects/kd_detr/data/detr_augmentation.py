# Copyright (c) kd_detr contributors.
"""DETR's training augmentation as Detectron2 augmentations.

DETR trains with a horizontal flip, then with probability 0.5 a resize of the shortest edge to one
of INPUT.DETR_CROP.RESIZE_SIZES followed by a random crop of INPUT.DETR_CROP.SIZE (absolute range),
then the usual multi-scale resize (INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN).
"""
from detectron2.data import transforms as T

__all__ = ["build_detr_train_augmentation"]


def build_detr_train_augmentation(cfg):
    """List of Detectron2 augmentations for DatasetMapper(cfg, True, augmentations=...)."""
    augmentations = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augmentations.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    if cfg.INPUT.DETR_CROP.ENABLED:
        resize_then_crop = T.AugmentationList(
            [
                T.ResizeShortestEdge(cfg.INPUT.DETR_CROP.RESIZE_SIZES, sample_style="choice"),
                T.RandomCrop("absolute_range", cfg.INPUT.DETR_CROP.SIZE),
            ]
        )
        augmentations.append(T.RandomApply(resize_then_crop, prob=0.5))
    augmentations.append(
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augmentations
