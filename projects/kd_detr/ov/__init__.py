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
from .detr_ov_head import QueryTextClassifier, build_detr_ov_class_head, set_detr_vocabulary
from .lvis_evaluation import LVISBoxEvalResult, LVISEvaluator, evaluate_lvis_boxes
from .lvis_split import (
    LVIS_FREQUENCIES,
    build_lvis_cat_info,
    build_lvis_norare_json,
    load_lvis_ovd_json,
    register_all_lvis_ovd,
    register_lvis_ovd,
)
from .ovd_data import expand_data_path, register_coco_ovd_from_config, shared_data_root
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
from .vild_output_layers import ViLDOutputLayers, vild_ensemble
from .vild_rcnn import ViLDRCNN
from .vild_roi_heads import ViLDROIHeads, vild_image_loss
