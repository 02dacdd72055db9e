# Copyright (c) kd_detr contributors.
"""Backbones; importing registers them in Detectron2's ``BACKBONE_REGISTRY``."""
from .efficientnet_lite import (
    EFFICIENTNET_LITE_INPUT_FORMAT,
    EFFICIENTNET_LITE_PIXEL_MEAN,
    EFFICIENTNET_LITE_PIXEL_STD,
    EfficientNetLite,
    build_efficientnet_lite_backbone,
    build_efficientnet_lite_fpn_backbone,
    build_efficientnet_lite_model,
)
from .hgnetv2 import HGNetV2, build_hgnetv2_backbone
from .resnet import (
    convert_torchvision_resnet,
    infer_resnet_depth,
    load_resnet_state_dict,
    save_detectron2_checkpoint,
)
from .resnet_vd import RESNET_VD_SPECS, ResNetVD, build_resnet_vd_backbone
