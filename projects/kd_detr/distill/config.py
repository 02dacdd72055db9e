# Copyright (c) kd_detr contributors.
"""Config keys of knowledge distillation: ``add_kd_config(cfg)`` adds ``MODEL.KD.*``."""
from detectron2.config import CfgNode as CN

from ..config import CONFIG_EXTENSION_REGISTRY

__all__ = ["add_kd_config"]


@CONFIG_EXTENSION_REGISTRY.register(name="distill")
def add_kd_config(cfg):
    """Add ``MODEL.KD.*`` to a Detectron2 config (in place). Called by ``add_kd_detr_config``."""
    cfg.MODEL.KD = CN()
    kd = cfg.MODEL.KD
    # Train the model (the student) with knowledge distillation from a teacher; False: plain
    # supervised training, no teacher is built.
    kd.ENABLED = False

    kd.TEACHER = CN()
    # The teacher's complete config (YAML), loaded with get_cfg() + add_kd_detr_config().
    kd.TEACHER.CONFIG_FILE = ""
    # Teacher checkpoint (path or URL) loaded with DetectionCheckpointer; the teacher is frozen.
    kd.TEACHER.WEIGHTS = ""
    # Overrides of the teacher config, a flat ["KEY", "VALUE", ...] list as on the command line.
    kd.TEACHER.OPTS = []

    # KD terms, names in KD_LOSS_REGISTRY; each is evaluated on every distillation point group.
    kd.LOSSES = ["KDDETRLoss"]
    # KDDETRLoss normalisation: "official" (the official code's formulas: class term summed over
    # points and averaged over logits, box terms divided by the local sum of weights),
    # "normalized" (softmax KL summed over classes; every term divided by the sum of weights,
    # all-reduced over ranks) or "sigmoid" (binary KL per class for sigmoid/focal classifiers,
    # normalised like "normalized").
    kd.MODE = "official"
    # Distillation temperature T of the class term (the term is multiplied by T^2).
    kd.TEMPERATURE = 10.0
    # Weights of the class KL, box L1 and box GIoU terms, the same for every group and layer.
    kd.CLS_WEIGHT = 1.0
    kd.L1_WEIGHT = 5.0
    kd.GIOU_WEIGHT = 2.0
    # Foreground rebalance: weight each point by the teacher's max foreground probability
    # (official); False: all points weigh 1 (the paper's "without FRW" ablation).
    kd.FOREGROUND_WEIGHTS = True

    kd.GENERAL = CN()
    # General distillation points: random boxes decoded by both models.
    kd.GENERAL.ENABLED = True
    # Mg, random boxes per iteration (shared by all images of the batch and by all ranks).
    kd.GENERAL.NUM_POINTS = 300
    # "sigmoid_normal" (official code: cx, cy, w, h = sigmoid(N(0, 1))) or "uniform" (the
    # paper's text: cx, cy ~ U[0, 1), w, h ~ U(SIZE_RANGE)).
    kd.GENERAL.DISTRIBUTION = "sigmoid_normal"
    # (min, max) of the box width and height, 0 <= min < max <= 1: the range of "uniform" and a
    # clamp for "sigmoid_normal" ((0, 1) keeps the official distribution unchanged).
    kd.GENERAL.SIZE_RANGE = (0.0, 1.0)

    kd.SPECIFIC = CN()
    # Specific distillation points: the teacher's own detection queries (boxes, plus content
    # vectors when teacher and student hidden sizes match), detached.
    kd.SPECIFIC.ENABLED = True

    # How teacher and student predictions are paired: "consistent" (KD-DETR: both models decode
    # the same points) or the paper's weaker baselines on the detection queries: "inconsistent"
    # (paired by query index), "similar_foreground" (paired through their Hungarian matches to
    # the same ground-truth object), "similar_general" (similar_foreground plus, per image, the
    # mean of each model's unmatched predictions).
    kd.POINTS = "consistent"
    # Teacher -> student classes when their class lists differ: entries "student:teacher" (class
    # names) and/or "*" (every other student class maps to the teacher class of the same name).
    # Empty: the class lists must be identical.
    kd.CLASS_MAPPING = []
    # Before training, copy into the student every teacher parameter and buffer outside the
    # backbone with the same name and shape (the transformer, heads and anchors when widths match).
    # Changes what a fair baseline is; the official recipe does not do it.
    kd.INIT_STUDENT_FROM_TEACHER = False
    # Multiplier of every KD loss (KDWeightSchedule hook): LOSS_FACTOR, ramped up linearly over
    # the first WARMUP_ITERS iterations trained with KD (iteration k gets (k + 1) / WARMUP_ITERS;
    # 0: constant). The ramp's start is checkpointed, so resuming continues it.
    kd.LOSS_FACTOR = 1.0
    kd.WARMUP_ITERS = 0
    # Seed of the general points: iteration i uses a generator seeded with hash(SEED, i), the
    # same on every rank and after resuming.
    kd.SEED = 0
