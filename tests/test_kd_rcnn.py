# Copyright (c) kd_detr contributors.
"""Distillation across architectures (``MODEL.KD.POINTS "boxes"``): DETR teacher -> Faster
R-CNN student and the reverse, through the KDTrainer on tiny models and 64-pixel images; the
start-up errors of pairs that cannot be distilled at boxes."""
import copy
import os
import tempfile
import unittest

import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from kd_detr.config import load_config
from kd_detr.distill import (
    BoxEvaluationPairing,
    DistillationPointSampler,
    Teacher,
    build_box_evaluator,
    sigmoid_to_softmax_logits,
)

from .common import REPO_ROOT
from .kd_helpers import TINY_CONFIG, TINY_OPTS, FixedBatchKDTrainer, save_teacher, synthetic_batch
from .model_helpers import config_from, single_thread_module
from .test_box_evaluation import RCNN_CONFIG, RCNN_OPTS, tiny_rcnn

setUpModule, tearDownModule = single_thread_module()

SOLVER = [
    "SEED", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "1",
    "SOLVER.STEPS", "()",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "SOLVER.BASE_LR", "1e-3",
    "TEST.EVAL_PERIOD", "0",
    "MODEL.KD.ENABLED", "True",
    "MODEL.KD.POINTS", "boxes",
    "MODEL.KD.MODE", "normalized",
    "MODEL.KD.GENERAL.NUM_POINTS", "5",
]  # fmt: skip
KEYS = ("pred_logits", "pred_boxes")


def rcnn_student_cfg(out, teacher_weights, *opts):
    """Tiny Faster R-CNN student (the demo's, no ImageNet weights) of the tiny DAB-DETR."""
    cfg = config_from(
        RCNN_CONFIG, *RCNN_OPTS, *SOLVER, "OUTPUT_DIR", out,
        "MODEL.KD.TEACHER.CONFIG_FILE", TINY_CONFIG,
        "MODEL.KD.TEACHER.WEIGHTS", teacher_weights,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "30", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        *opts,
    )  # fmt: skip
    cfg.MODEL.KD.TEACHER.OPTS = list(TINY_OPTS)
    cfg.freeze()
    return cfg


def detr_student_cfg(out, teacher_weights, *opts):
    """Tiny DAB-DETR student of the tiny Faster R-CNN."""
    cfg = config_from(
        TINY_CONFIG, *TINY_OPTS, *SOLVER, "OUTPUT_DIR", out,
        "SOLVER.OPTIMIZER", "ADAMW",
        "MODEL.KD.MODE", "sigmoid",
        "MODEL.KD.BOXES.NUM_TEACHER_BOXES", "6",
        "MODEL.KD.TEACHER.CONFIG_FILE", RCNN_CONFIG,
        "MODEL.KD.TEACHER.WEIGHTS", teacher_weights,
        *opts,
    )  # fmt: skip
    cfg.MODEL.KD.TEACHER.OPTS = list(RCNN_OPTS)
    cfg.freeze()
    return cfg


def _one_step(cfg):
    """A KD trainer, its teacher's and student's state before, and the loss dict of one step
    (the gradients of that step are left on the parameters)."""
    torch.manual_seed(0)
    trainer = FixedBatchKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    teacher_before = copy.deepcopy(trainer.teacher.model.state_dict())
    student_before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    return trainer, teacher_before, student_before


class _CrossArchitectureChecks:
    def test_kd_and_detection_losses_logged(self):
        latest = self.trainer.storage.latest()
        for key in self.expected_losses:
            self.assertIn(key, latest)
            self.assertTrue(torch.isfinite(torch.tensor(latest[key][0])), key)

    def test_gradients_reach_the_student_only(self):
        teacher = self.trainer.teacher
        for name, value in teacher.model.state_dict().items():
            self.assertTrue(torch.equal(value, self.teacher_before[name]), name)
        self.assertTrue(all(p.grad is None and not p.requires_grad for p in teacher.parameters()))
        after = self.trainer.model.state_dict()
        changed = {k for k, v in self.student_before.items() if not torch.equal(v, after[k])}
        for name in self.trained_params:
            self.assertIn(name, changed)


class TestDETRTeacherRCNNStudent(_CrossArchitectureChecks, unittest.TestCase):
    expected_losses = (
        "loss_cls", "loss_rpn_cls", "loss_kd_cls_specific", "loss_kd_bbox_general",
        "loss_kd_giou_proposals",
    )  # fmt: skip
    trained_params = ("roi_heads.box_predictor.cls_score.weight", "backbone.fpn_output3.weight")

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        weights = save_teacher(cls._tmp.name)
        cls.cfg = rcnn_student_cfg(
            os.path.join(cls._tmp.name, "out"), weights,
            "MODEL.KD.BOXES.STUDENT_PROPOSALS", "True", "MODEL.KD.BOXES.NUM_STUDENT_PROPOSALS", "7",
        )  # fmt: skip
        cls.trainer, cls.teacher_before, cls.student_before = _one_step(cls.cfg)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_points_and_targets(self):
        """The student's ROI heads evaluate the teacher's final boxes, the general boxes and its
        own proposals; the targets are the teacher's outputs there, converted to softmax."""
        trainer = self.trainer
        pairing = trainer.pairing
        data = synthetic_batch(2)
        with EventStorage(0):  # Detectron2's training losses log to it
            loss_dict, context = pairing.run(trainer.model, data, 3)
        names = [p.name for p in context.pairs]
        self.assertEqual(names, ["specific", "general", "proposals"])
        own, t_groups = context.teacher_outputs["own"], context.teacher_outputs["groups"]
        general = DistillationPointSampler(self.cfg).sample(3)
        with torch.no_grad():
            raw = trainer.teacher.model.forward_raw(
                trainer.teacher.preprocess_image(data), [{"boxes": general}]
            )
        torch.testing.assert_close(own["boxes"], raw["pred_boxes"])
        torch.testing.assert_close(t_groups[1]["pred_logits"], raw["groups"][0]["pred_logits"])
        specific = context.pairs[0]
        self.assertEqual(specific.student["pred_logits"].shape, (1, 2, 6, 5))
        expected = sigmoid_to_softmax_logits(raw["pred_logits"], "product")
        torch.testing.assert_close(specific.teacher["pred_logits"], expected)
        torch.testing.assert_close(specific.teacher["pred_boxes"], raw["pred_boxes"])
        torch.testing.assert_close(specific.weights, raw["pred_logits"].sigmoid().amax(-1))
        # The student's evaluation is its ROI heads' at those boxes, with gradient.
        student = trainer.model
        evaluator = build_box_evaluator(student)
        with torch.no_grad():
            images = evaluator.preprocess_image(data)
            (direct,) = evaluator.evaluate_boxes(images, [own["boxes"]])
        self.assertTrue(specific.student["pred_logits"].requires_grad)
        for key in KEYS:
            got = specific.student[key].detach()
            torch.testing.assert_close(got, direct[key], rtol=1e-4, atol=1e-4)
        self.assertEqual(context.pairs[2].student["pred_boxes"].shape, (1, 2, 7, 4))
        self.assertIn("loss_rpn_loc", loss_dict)


class TestRCNNTeacherDETRStudent(_CrossArchitectureChecks, unittest.TestCase):
    expected_losses = (
        "loss_class", "loss_kd_cls_specific", "loss_kd_cls_specific_0", "loss_kd_giou_general",
    )  # fmt: skip
    trained_params = ("class_embed.weight", "transformer.decoder.layers.0.sa_qcontent_proj.weight")

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        path = os.path.join(cls._tmp.name, "rcnn.pth")
        torch.save({"model": tiny_rcnn(seed=1).state_dict()}, path)
        cls.cfg = detr_student_cfg(os.path.join(cls._tmp.name, "out"), path)
        cls.trainer, cls.teacher_before, cls.student_before = _one_step(cls.cfg)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_points_and_targets(self):
        """The student decodes the teacher's proposals and the general boxes as query groups;
        the targets are the teacher's ROI outputs there, each class's softmax probability as a
        sigmoid target."""
        trainer = self.trainer
        data = synthetic_batch(2)
        with EventStorage(0):
            loss_dict, context = trainer.pairing.run(trainer.model, data, 0)
        self.assertEqual([p.name for p in context.pairs], ["specific", "general"])
        own = context.teacher_outputs["own"]
        self.assertEqual(own["boxes"].shape, (2, 6, 4))
        teacher_eval = build_box_evaluator(trainer.teacher.model)
        with torch.no_grad():
            images = trainer.teacher.preprocess_image(data)
            (direct,) = teacher_eval.evaluate_boxes(images, [own["boxes"]])
            images = trainer.model.preprocess_image(data)
            raw = trainer.model.forward_raw(images, [{"boxes": own["boxes"]}])
        specific = context.pairs[0]
        probs = direct["pred_logits"][0].double().softmax(-1)
        got = specific.teacher["pred_logits"].double().sigmoid()
        torch.testing.assert_close(got, probs[..., :-1])
        torch.testing.assert_close(specific.weights, probs[..., :-1].amax(-1).float())
        torch.testing.assert_close(specific.teacher["pred_boxes"], direct["pred_boxes"][0])
        self.assertEqual(specific.student["pred_logits"].shape, (2, 2, 6, 4))  # every layer
        # Training mode without dropout: the training forward decodes what forward_raw does.
        for key in KEYS:
            got = specific.student[key].detach()
            torch.testing.assert_close(got, raw["groups"][0][key], rtol=1e-4, atol=1e-4)
        self.assertIn("loss_giou", loss_dict)


class TestStartupErrors(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rcnn = tiny_rcnn()
        torch.manual_seed(0)
        cls.detr_cfg = config_from(TINY_CONFIG, *TINY_OPTS)

    def _pairing(self, student, teacher_model, **kwargs):
        return BoxEvaluationPairing(student=student, teacher=Teacher(teacher_model, None), **kwargs)

    def test_teacher_without_box_queries(self):
        detr = build_model(
            config_from(
                os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml"),
                "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.DETR.NUM_CLASSES", "4",
            )
        )  # fmt: skip
        with self.assertRaisesRegex(
            ValueError, r"DETR teacher -> GeneralizedRCNN student.*teacher DETR.*box queries"
        ):
            self._pairing(self.rcnn, detr)

    def test_model_without_an_adapter(self):
        with self.assertRaisesRegex(
            TypeError, r"Linear teacher -> GeneralizedRCNN student.*no box evaluator"
        ):
            self._pairing(self.rcnn, torch.nn.Linear(2, 2))

    def test_classes_that_cannot_be_reconciled(self):
        cfg = self.detr_cfg.clone()
        cfg.MODEL.DETR.NUM_CLASSES = 3
        with self.assertRaisesRegex(
            ValueError, r"classes of the DABDETR teacher -> GeneralizedRCNN student.*3 classes"
        ):
            self._pairing(self.rcnn, build_model(cfg))

    def test_student_proposals_need_an_rcnn_student(self):
        with self.assertRaisesRegex(ValueError, "STUDENT_PROPOSALS needs a student with proposals"):
            self._pairing(build_model(self.detr_cfg), self.rcnn, student_proposals=True)

    def test_sigmoid_mode_needs_a_sigmoid_student(self):
        opts = [*RCNN_OPTS, "MODEL.KD.MODE", "sigmoid"]
        cfg = load_config(RCNN_CONFIG, opts, register_datasets=False)
        with self.assertRaisesRegex(ValueError, "'sigmoid' needs a sigmoid"):
            BoxEvaluationPairing.from_config(
                cfg, student=self.rcnn, teacher=Teacher(build_model(self.detr_cfg), None)
            )

    def test_terms_reading_more_than_points(self):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = rcnn_student_cfg(tmp, save_teacher(tmp), "MODEL.KD.LOSSES", "['FitNetLoss']")
            with self.assertRaisesRegex(ValueError, r"distillation points only.*FitNetLoss"):
                FixedBatchKDTrainer(cfg)


if __name__ == "__main__":
    unittest.main()
