# Copyright (c) kd_detr contributors.
"""The distillation layer's contracts: the DistillableDETR interface of every DETR-family model,
the start-up errors of models that cannot be distilled, the pairing registry, and the KD context
holding exactly what the configured terms declared."""
import os
import tempfile
import unittest

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import build_model

from kd_detr.distill import (
    KD_LOSS_REGISTRY,
    KD_PAIRING_REGISTRY,
    DistillableDETR,
    KDTerm,
    Teacher,
    build_kd_context,
    check_distillable,
    encoder_memory,
    missing_members,
)

from .common import REPO_ROOT
from .kd_helpers import (
    TINY_OPTS,
    FixedBatchKDTrainer,
    config_from,
    kd_cfg,
    save_teacher,
    synthetic_batch,
)
from .model_helpers import single_thread_module

TESTS = os.path.join(REPO_ROOT, "configs", "tests")
MODELS = {
    "DETR": os.path.join(TESTS, "detr_tiny_parity.yaml"),
    "DABDETR": os.path.join(TESTS, "dab_detr_tiny_parity.yaml"),
    "DeformableDETR": os.path.join(TESTS, "deformable_detr_tiny_parity.yaml"),
    "DINO": os.path.join(TESTS, "dino_tiny.yaml"),
    "RTDETR": os.path.join(TESTS, "rt_detr_tiny_parity.yaml"),
    "DFINE": os.path.join(TESTS, "dfine_tiny_parity.yaml"),
}

setUpModule, tearDownModule = single_thread_module()


class RecordingTerm(KDTerm):
    """Records the context it is given; declares every input; no loss."""

    inputs = frozenset({"points", "matching", "backbone_features", "encoder_memory"})
    seen = []

    @configurable
    def __init__(self):
        super().__init__()

    @classmethod
    def from_config(cls, cfg):
        return {}

    def forward(self, context):
        RecordingTerm.seen.append(context)
        return {}


if "RecordingTerm" not in KD_LOSS_REGISTRY:
    KD_LOSS_REGISTRY.register(RecordingTerm)


class TestDistillableInterface(unittest.TestCase):
    def test_every_detr_family_model_implements_it(self):
        for arch, config in MODELS.items():
            with self.subTest(arch=arch):
                model = build_model(config_from(config, *TINY_OPTS))
                self.assertEqual(type(model).__name__, arch)
                self.assertIsInstance(model, DistillableDETR)
                self.assertEqual(missing_members(model), [])
                self.assertEqual(model.box_query_groups, arch != "DETR")
                self.assertEqual(model.hidden_dim, model.transformer.d_model)

    def test_faster_rcnn_and_vanilla_detr_are_named_in_the_error(self):
        demo = os.path.join(REPO_ROOT, "configs", "demo", "faster_rcnn_efflite0_fpn_demo.yaml")
        rcnn = build_model(config_from(demo, "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"))
        with self.assertRaisesRegex(TypeError, r"teacher \(GeneralizedRCNN\).*lacks.*forward_raw"):
            check_distillable(rcnn, "teacher")
        detr = build_model(config_from(MODELS["DETR"], *TINY_OPTS))
        check_distillable(detr, "student")  # content groups only: fine without box groups
        with self.assertRaisesRegex(ValueError, r"student \(DETR\) has no box queries.*consistent"):
            check_distillable(detr, "student", box_groups=True, what="MODEL.KD.POINTS consistent")

    def test_backbone_features_are_kept_only_when_asked(self):
        for arch in ("DABDETR", "DeformableDETR", "RTDETR"):
            model = build_model(config_from(MODELS[arch], *TINY_OPTS)).eval()
            images = (torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
            with torch.no_grad():
                plain = model.forward_raw(images)
                model.keep_backbone_features = True
                kept = model.forward_raw(images)
            self.assertNotIn("backbone_features", plain["encoder"])
            kept_names = set(kept["encoder"]["backbone_features"])
            self.assertEqual(kept_names, set(model.backbone.output_shape()))
            torch.testing.assert_close(kept["pred_logits"], plain["pred_logits"], rtol=0, atol=0)
            memory = encoder_memory(kept)
            total = sum(h * w for h, w in memory["spatial_shapes"])
            self.assertEqual(memory["memory"].shape[:2], (1, total))
            self.assertEqual(memory["padding_mask"].shape, (1, total))


class TestPairingRegistry(unittest.TestCase):
    def test_names_and_unknown_points(self):
        self.assertEqual(
            KD_PAIRING_REGISTRY.names(),
            ["consistent", "inconsistent", "similar_foreground", "similar_general", "boxes"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            with self.assertRaisesRegex(ValueError, "MODEL.KD.POINTS must be one of.*'nearest'"):
                FixedBatchKDTrainer(kd_cfg(tmp, weights, "MODEL.KD.POINTS", "nearest"))


class TestKDContext(unittest.TestCase):
    def run_step(self, *opts):
        RecordingTerm.seen.clear()
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            trainer = FixedBatchKDTrainer(kd_cfg(tmp, weights, *opts))
            trainer.resume_or_load(resume=False)
            trainer.train()
        return trainer, (RecordingTerm.seen[-1] if RecordingTerm.seen else None)

    def test_only_point_terms_compute_nothing_else(self):
        trainer, _ = self.run_step("MODEL.KD.LOSSES", "['KDDETRLoss', 'RecordingTerm']")
        self.assertEqual(
            trainer._trainer.kd_inputs,
            {"points", "targets", "matching", "backbone_features", "encoder_memory"},
        )
        plain, _ = self.run_step()
        self.assertEqual(plain._trainer.kd_inputs, {"points"})
        self.assertFalse(plain.model.keep_backbone_features)
        self.assertFalse(plain.teacher.model.keep_backbone_features)

    def test_context_holds_what_the_terms_declared(self):
        trainer, ctx = self.run_step("MODEL.KD.LOSSES", "['KDDETRLoss', 'RecordingTerm']")
        self.assertEqual([p.name for p in ctx.pairs], ["specific", "general"])
        self.assertEqual(len(ctx.targets), 2)
        student, teacher = trainer.model, trainer.teacher.model
        self.assertTrue(student.keep_backbone_features and teacher.keep_backbone_features)
        self.assertIn("res5", ctx.backbone_features("student"))
        self.assertIn("res5", ctx.backbone_features("teacher"))
        self.assertFalse(ctx.backbone_features("teacher")["res5"].requires_grad)
        self.assertEqual(ctx.encoder_memory("student")["memory"].shape[-1], student.hidden_dim)
        # matching equals each model's own Hungarian matcher on its final detection outputs
        s_out, t_out = ctx.student_outputs, ctx.teacher_outputs
        final = {k: s_out[k].detach() for k in ("pred_logits", "pred_boxes")}
        expected = student.criterion.matcher(final, ctx.targets)
        for (q, t), (eq, et) in zip(ctx.student_matching, expected):
            self.assertTrue(torch.equal(q, eq) and torch.equal(t, et))
        t_final = {k: t_out[k] for k in ("pred_logits", "pred_boxes")}
        expected = teacher.criterion.matcher(t_final, ctx.targets)
        for (q, t), (eq, et) in zip(ctx.teacher_matching, expected):
            self.assertTrue(torch.equal(q, eq) and torch.equal(t, et))

    def test_teacher_detections_only_when_declared(self):
        """"detections": every layer of the teacher's detection queries, detached, logits in the
        student's classes (a softmax teacher's unmapped classes folded at T = 1)."""

        class SoftmaxTeacher(nn.Module):
            use_focal = False

        teacher = Teacher(SoftmaxTeacher(), None, class_index=[2, 0], temperature=10.0)
        gen = torch.Generator().manual_seed(0)
        layers = {"pred_logits": torch.randn(2, 1, 3, 4, generator=gen, requires_grad=True),
                  "pred_boxes": torch.rand(2, 1, 3, 4, generator=gen),
                  "hidden_states": torch.randn(2, 1, 3, 5, generator=gen)}  # fmt: skip
        batch = [{"image": torch.zeros(3, 8, 8)}]

        def context(inputs):
            return build_kd_context(0, batch, {}, {"layers": layers}, frozenset(inputs),
                                    student=None, teacher=teacher)  # fmt: skip

        self.assertIsNone(context({"points"}).teacher_detections)
        det = context({"detections"}).teacher_detections
        self.assertEqual(set(det), {"pred_logits", "pred_boxes", "hidden_states"})
        self.assertFalse(det["pred_logits"].requires_grad)
        self.assertTrue(torch.equal(det["pred_boxes"], layers["pred_boxes"]))
        p_teacher = layers["pred_logits"].detach().double().softmax(-1)
        p_student = det["pred_logits"].double().softmax(-1)  # classes (teacher 2, teacher 0, bg)
        torch.testing.assert_close(p_student[..., :2], p_teacher[..., [2, 0]])
        torch.testing.assert_close(p_student[..., 2], p_teacher[..., [1, 3]].sum(-1))

    def test_term_with_unknown_input_is_rejected(self):
        with self.assertRaisesRegex(TypeError, "unknown entries.*'gradients'"):

            class Bad(KDTerm):  # noqa: F841
                inputs = frozenset({"gradients"})

    def test_repeated_loss_keys_are_an_error(self):
        class Twice(nn.Module):
            inputs = frozenset()

            def forward(self, context):
                return {"loss_class": torch.zeros(())}

        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            trainer = FixedBatchKDTrainer(kd_cfg(tmp, weights))
            trainer._trainer.kd_losses.append(Twice())
            with self.assertRaisesRegex(KeyError, "repeats loss keys.*loss_class"):
                trainer._trainer.compute_losses(synthetic_batch(2))
