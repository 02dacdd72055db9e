# Copyright (c) kd_detr contributors.
"""Open-vocabulary detection: class text embeddings, a region-text classifier, ViLD ROI heads,
COCO-OVD and LVIS. A plug-in layer: importing it registers its config keys, the ``region_text``
class head, the ``COCO_OVD`` dataset source, the ``VILD_REGIONS`` training mapper, the
``coco_ovd`` / ``lvis`` evaluators and the ViLD meta-architecture / ROI heads."""
from .coco_ovd import (
    COCO_OVD_BASE_IDS,
    COCO_OVD_IDS,
    COCO_OVD_NOVEL_IDS,
    COCOOVDEvaluator,
    build_coco_ovd_json,
    register_coco_ovd,
)
from .config import add_ov_config
from .detr_ov_head import QueryTextClassifier, build_region_text_class_head, set_detr_vocabulary
from .lvis_evaluation import LVISBoxEvalResult, LVISEvaluator, evaluate_lvis_boxes
from .lvis_split import (
    LVIS_FREQUENCIES,
    build_lvis_cat_info,
    build_lvis_norare_json,
    load_lvis_ovd_json,
    register_all_lvis_ovd,
    register_lvis_ovd,
)
from .ovd_data import register_coco_ovd_from_config
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
from .vild_data import ViLDDatasetMapper, build_vild_train_mapper
from .vild_output_layers import ViLDOutputLayers, vild_ensemble
from .vild_rcnn import ViLDRCNN
from .vild_roi_heads import ViLDROIHeads, vild_image_loss
