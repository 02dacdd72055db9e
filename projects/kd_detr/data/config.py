# Copyright (c) kd_detr contributors.
"""Config keys of the data layer: the demo dataset, datasets listed in the config, DETR crop."""
from detectron2.config import CfgNode as CN

__all__ = ["add_data_config"]


def add_data_config(cfg):
    """Add ``DATASETS.{KD_DEMO, COCO_JSON, VOC, INCREMENTAL}``, ``INPUT.DETR_CROP`` and
    ``DATALOADER.ON_BAD_IMAGE`` in place."""
    # An image that cannot be read or decoded: "error" stops with the file named; "skip" skips
    # it in training with a warning naming the file and the count (evaluation always stops).
    cfg.DATALOADER.ON_BAD_IMAGE = "error"
    # Before training / evaluation, check the datasets' image files: every file exists and the
    # headers of up to 2,000 images per dataset match the annotated width / height.
    cfg.DATALOADER.CHECK_IMAGES = True
    # Built-in synthetic demo dataset, registered as "kd_demo_train" / "kd_demo_val". Images are
    # generated deterministically on first use into DATASETS.KD_DEMO.ROOT.
    cfg.DATASETS.KD_DEMO = CN()
    # Cache directory; "" means $KD_DETR_DATA, else <user cache dir>/kd_detr.
    cfg.DATASETS.KD_DEMO.ROOT = ""
    cfg.DATASETS.KD_DEMO.NUM_TRAIN = 600
    cfg.DATASETS.KD_DEMO.NUM_VAL = 100
    # Square image side in pixels.
    cfg.DATASETS.KD_DEMO.IMAGE_SIZE = 192
    # Objects per image are drawn uniformly from [MIN_OBJECTS, MAX_OBJECTS].
    cfg.DATASETS.KD_DEMO.MIN_OBJECTS = 1
    cfg.DATASETS.KD_DEMO.MAX_OBJECTS = 4
    # Object side as a fraction of IMAGE_SIZE, drawn uniformly from this range.
    cfg.DATASETS.KD_DEMO.OBJECT_SIZE = (0.15, 0.45)
    cfg.DATASETS.KD_DEMO.SEED = 0
    # Extra datasets registered from config, one string each:
    # COCO_JSON: "name,path/to/instances.json,path/to/image_root"
    cfg.DATASETS.COCO_JSON = []
    # DETR's random "resize then crop" (applied with probability 0.5 before the final resize);
    # used by Trainer.build_train_loader when enabled.
    cfg.INPUT.DETR_CROP = CN()
    cfg.INPUT.DETR_CROP.ENABLED = False
    # Shortest-edge sizes of the resize before the crop.
    cfg.INPUT.DETR_CROP.RESIZE_SIZES = (400, 500, 600)
    # Crop height and width are drawn from this range in pixels ("absolute_range").
    cfg.INPUT.DETR_CROP.SIZE = (384, 600)
    # VOC: "name,path/to/VOCdevkit_like_dir,split,class1;class2;..."
    # (split is an ImageSets/Main file)
    cfg.DATASETS.VOC = []
    # Class-incremental few-shot split (Incremental-DETR), registered as <NAME>_base_train (base
    # classes only), <NAME>_novel_train (SHOTS images per novel class) and <NAME>_val (every
    # class; base / novel named for the coco_incremental evaluator). The defaults are the demo
    # split "kd_demo_incremental" (3 base shapes, the cross novel). See incremental_split.py.
    cfg.DATASETS.INCREMENTAL = CN()
    # Name prefix of the three datasets; "" registers none.
    cfg.DATASETS.INCREMENTAL.NAME = "kd_demo_incremental"
    # Registered datasets the split is drawn from: the training set (base and few-shot sets)
    # and the test set (evaluated on every class).
    cfg.DATASETS.INCREMENTAL.TRAIN_SOURCE = "kd_demo_train"
    cfg.DATASETS.INCREMENTAL.TEST_SOURCE = "kd_demo_val"
    # Contiguous 0-based ids of the base classes; every other class is novel.
    cfg.DATASETS.INCREMENTAL.BASE_CLASSES = [0, 1, 2]
    # k: training images per novel class in the few-shot set.
    cfg.DATASETS.INCREMENTAL.SHOTS = 10
    # Seed of the few-shot draw (the same seed gives the same images).
    cfg.DATASETS.INCREMENTAL.SEED = 0
