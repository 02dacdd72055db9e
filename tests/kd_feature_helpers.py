# Copyright (c) kd_detr contributors.
"""Shared fixtures of the backbone-feature KD term tests (FGD, MGD, KDEP): stand-in models for
``bind``, a context holding hand-made backbone maps, and a KDTrainer on the demo pair
(DAB-DETR EfficientNet-Lite2 teacher -> Lite0 student, random weights, tiny synthetic batch)."""
import os

from torch import nn

from detectron2.layers import ShapeSpec

from kd_detr.distill import KDContext

from .common import REPO_ROOT
from .kd_helpers import TINY_OPTS, FixedBatchKDTrainer, kd_student_cfg, save_teacher

DEMO_STUDENT = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite0_demo.yaml")
DEMO_TEACHER = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite2_demo.yaml")
NO_IMAGENET = ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]


class StandInModel(nn.Module):
    """The parts of a DETR model the feature terms' ``bind`` reads: a backbone whose
    ``output_shape()`` is ``{name: ShapeSpec(channels, stride)}``."""

    def __init__(self, shapes):
        super().__init__()
        specs = {name: ShapeSpec(channels=c, stride=s) for name, (c, s) in shapes.items()}
        self.backbone = type("Backbone", (), {"output_shape": lambda _: specs})()


class NoBackboneModel(nn.Module):
    """A model without a Detectron2 backbone (e.g. a wrapped foreign detector)."""


def feature_context(student_maps, teacher_maps, targets=None, image_sizes=()):
    """A KDContext whose models' backbone outputs are the given {name: (B, C, H, W)} maps."""

    def outputs(maps):
        return {"encoder": {"backbone_features": maps}}

    return KDContext(
        0, [], list(image_sizes), outputs(student_maps), outputs(teacher_maps), False,
        targets=targets,
    )  # fmt: skip


def demo_pair_trainer(tmp, *opts):
    """A FixedBatchKDTrainer (1 iteration, 64 px synthetic images, TINY_OPTS heads) of the demo
    student distilled from a randomly initialised demo teacher saved under ``tmp``, with ``opts``
    (e.g. the KD terms) merged last."""
    weights = save_teacher(tmp, *NO_IMAGENET, config_file=DEMO_TEACHER)
    cfg = kd_student_cfg(DEMO_STUDENT, os.path.join(tmp, "run"), weights, NO_IMAGENET)
    cfg.defrost()
    cfg.MODEL.KD.TEACHER.CONFIG_FILE = DEMO_TEACHER
    cfg.MODEL.KD.TEACHER.OPTS = NO_IMAGENET + TINY_OPTS
    cfg.merge_from_list(["SOLVER.MAX_ITER", "1", *opts])
    cfg.freeze()
    return FixedBatchKDTrainer(cfg)


def logged_losses(trainer):
    """The ``loss_*`` values of the trainer's last iteration."""
    return {k: v for k, (v, _) in trainer.storage.latest().items() if k.startswith("loss_")}


def term_parameter_checks(test, trainer, term):
    """The term's parameters are in the optimizer and not in the teacher."""
    ids = {id(p) for p in term.parameters()}
    test.assertTrue(ids)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    test.assertTrue(ids <= in_optimizer)
    test.assertFalse(ids & {id(p) for p in trainer.teacher.parameters()})
