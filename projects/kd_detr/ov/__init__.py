# Copyright (c) kd_detr contributors.
"""Open-vocabulary detection: class text embeddings, a region-text classifier, COCO-OVD."""
from .coco_ovd import (
    COCO_OVD_BASE_IDS,
    COCO_OVD_IDS,
    COCO_OVD_NOVEL_IDS,
    COCOOVDEvaluator,
    build_coco_ovd_json,
    register_coco_ovd,
)
from .config import add_ov_config
from .region_text_classifier import RegionTextClassifier, federated_classes, load_class_freq_weight
from .text_embeddings import (
    PROMPT_TEMPLATES,
    build_text_embeddings,
    coco_class_names,
    encode_class_names,
    load_text_embeddings,
    lvis_class_names,
    read_names_file,
    read_sidecar,
)
