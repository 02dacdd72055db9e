# Copyright (c) kd_detr contributors.
"""The distillation layer's building blocks: the distillable-model interface, KD loss terms
(``KD_LOSS_REGISTRY``) and their context, pairings (``KD_PAIRING_REGISTRY``), distillation
points, foreground weights, class mapping, the frozen teacher and box evaluation
(``BOX_EVALUATOR_REGISTRY``, any teacher / any student). Importing registers the KD
config keys, terms and pairings."""
from .base_classes import base_class_indices, config_base_classes
from .baselines import inconsistent_pairs, similar_foreground_pairs, similar_general_pairs
from .box_evaluation import (
    BOX_EVALUATOR_REGISTRY,
    BoxEvaluator,
    DETRBoxEvaluator,
    RCNNBoxEvaluator,
    build_box_evaluator,
    fixed_count_boxes,
)
from .class_mapping import (
    BACKGROUND_RULES,
    build_class_mapping,
    convert_class_logits,
    map_teacher_logits,
    sigmoid_to_softmax_logits,
    softmax_to_sigmoid_logits,
)
from .config import add_kd_config
from .context import KD_INPUTS, KDContext, PointPair, encoder_memory
from .ctkd import CTKDLoss, GradientReversal, add_ctkd_config, ctkd_lambda, kl_at_temperature
from .d3etr import D3ETRLoss, add_d3etr_config, attention_sums, fixed_pairs
from .detr_distill import (
    DETRDistillLoss,
    SoftLabelHungarianMatcher,
    add_detr_distill_config,
    soft_class_loss,
    teacher_layer,
)
from .distribution_kd import (
    DDF_MATCHING,
    DistributionKDLoss,
    add_distribution_kd_config,
    align_edge_distributions,
    decoupled_distillation_focal_loss,
)
from .dkd import DKDLoss, add_dkd_config, dkd_point_losses
from .ema import EMATeacher, add_ema_config, check_ema_config, ema_enabled, ema_update_
from .feature_maps import FeaturePair, backbone_feature_pairs, resize_to
from .fgd import FGDLoss, GlobalContextBlock, add_fgd_config, fgd_attention, fgd_box_masks
from .fingerprint import TeacherFingerprint, file_sha256
from .fitnet import FitNetLoss, add_fitnet_config
from .interface import DistillableDETR, check_distillable, missing_members
from .kdep import KDEPLoss, add_kdep_config, kdep_targets, svd_basis
from .losses import (
    KD_MODES,
    KDDETRLoss,
    all_reduce_sum,
    final_layer_targets,
    kd_detr_losses,
    sigmoid_kl,
    softmax_kl,
)
from .masked_feature import MaskedFeatureKDLoss, add_incremental_kd_config, novel_feature_mask
from .mgd import MGDLoss, add_mgd_config, generation_block
from .mlkd import MLKDLoss, add_mlkd_config, mlkd_confidence_mask, mlkd_levels
from .pairing import (
    KD_PAIRING_REGISTRY,
    ConsistentPairing,
    InconsistentPairing,
    KDPairing,
    SimilarForegroundPairing,
    SimilarGeneralPairing,
    build_pairing,
)
from .points import DISTRIBUTIONS, DistillationPointSampler, specific_points
from .qskd import QSKDLoss, add_qskd_config, select_queries
from .registry import KD_LOSS_REGISTRY, build_kd_losses
from .set_targets import floor_class_probabilities, suppress_duplicate_targets
from .step import build_kd_context, kd_inputs, keeping_attention_maps
from .teacher import (
    Teacher,
    build_teacher,
    init_student_from_teacher,
    load_teacher_weights,
    teacher_class_index,
)
from .term import KDTerm, PointKDTerm
from .weights import foreground_weights, sigmoid_foreground_weights, softmax_foreground_weights

# After .config: MODEL.KD.BOXES extends MODEL.KD.
from .box_pairing import BoxEvaluationPairing, add_box_kd_config  # noqa: E402  (isort: skip)
