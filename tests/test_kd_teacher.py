# Copyright (c) kd_detr contributors.
"""build_teacher: frozen holder outside the student, clear errors, class check, student init."""
import os
import tempfile
import unittest

import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from kd_detr.distill import Teacher, build_teacher, init_student_from_teacher, load_teacher_weights

from .kd_helpers import kd_cfg, save_teacher, synthetic_batch, tiny_cfg
from .model_helpers import single_thread

STUDENT_CLASSES = ["circle", "square", "triangle", "cross"]
TEACHER_CLASSES = ["square", "circle", "star", "cross", "triangle"]


def setUpModule():
    global _threads
    _threads = single_thread()
    _threads.__enter__()
    MetadataCatalog.get("kd_test_student4").set(thing_classes=STUDENT_CLASSES)
    MetadataCatalog.get("kd_test_teacher5").set(thing_classes=TEACHER_CLASSES)


def tearDownModule():
    _threads.__exit__(None, None, None)


class TestBuildTeacher(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.weights = save_teacher(cls.tmp)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def cfg(self, *opts, teacher_opts=()):
        cfg = kd_cfg(self.tmp, self.weights, *opts)
        cfg.defrost()
        cfg.MODEL.KD.TEACHER.OPTS = cfg.MODEL.KD.TEACHER.OPTS + list(teacher_opts)
        cfg.freeze()
        return cfg

    def test_frozen_loaded_holder(self):
        teacher = build_teacher(self.cfg())
        self.assertIsInstance(teacher, Teacher)
        self.assertNotIsInstance(teacher, torch.nn.Module)
        self.assertTrue(teacher.is_frozen())
        saved = torch.load(self.weights, weights_only=False)["model"]
        for name, value in teacher.model.state_dict().items():
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
        self.assertIsNone(teacher.class_index)
        self.assertFalse(teacher.flip_channels)
        # Called under grad mode and after .train(): no graph, back in eval mode.
        teacher.model.train()
        out = teacher(synthetic_batch(1))
        self.assertFalse(teacher.model.training)
        self.assertFalse(out["pred_logits"].requires_grad)

    def test_missing_weights_file_is_a_clear_error(self):
        missing = os.path.join(self.tmp, "nope.pth")
        with self.assertRaises(FileNotFoundError) as ctx:
            build_teacher(self.cfg("MODEL.KD.TEACHER.WEIGHTS", missing))
        for part in (missing, "MODEL.KD.TEACHER.WEIGHTS", "dab_detr_tiny_parity.yaml"):
            self.assertIn(part, str(ctx.exception))
        with self.assertRaisesRegex(ValueError, "MODEL.KD.TEACHER.WEIGHTS is empty"):
            build_teacher(self.cfg("MODEL.KD.TEACHER.WEIGHTS", ""))
        with self.assertRaisesRegex(FileNotFoundError, "CONFIG_FILE"):
            build_teacher(self.cfg("MODEL.KD.TEACHER.CONFIG_FILE", missing))

    def test_key_mismatch_is_a_clear_error(self):
        model = build_model(tiny_cfg())
        state = dict(torch.load(self.weights, weights_only=False)["model"])
        state.pop("class_embed.bias")
        state["extra_head.weight"] = torch.zeros(2)
        state["refpoint_embed.weight"] = torch.zeros(9, 4)
        path = os.path.join(self.tmp, "broken.pth")
        torch.save({"model": state}, path)
        with self.assertRaises(ValueError) as ctx:
            load_teacher_weights(model, path, "teacher.yaml")
        message = str(ctx.exception)
        for part in (
            "missing keys: class_embed.bias",
            "unexpected keys: extra_head.weight",
            "refpoint_embed.weight (9, 4) vs model (6, 4)",
            path,
            "teacher.yaml",
        ):
            self.assertIn(part, message)

    def test_class_count_mismatch_without_mapping(self):
        # Without class names: the counts must agree.
        with self.assertRaises(ValueError) as ctx:
            build_teacher(self.cfg(teacher_opts=["MODEL.DETR.NUM_CLASSES", "5"]))
        self.assertIn("student has 4 classes, teacher has 5", str(ctx.exception))
        # With class names: a different list needs MODEL.KD.CLASS_MAPPING ...
        names = ["DATASETS.TRAIN", "('kd_test_student4',)"]
        teacher_names = ["DATASETS.TRAIN", "('kd_test_teacher5',)", "MODEL.DETR.NUM_CLASSES", "5"]
        with self.assertRaises(ValueError) as ctx:
            build_teacher(self.cfg(*names, teacher_opts=teacher_names))
        for part in ("MODEL.KD.CLASS_MAPPING", "4 classes", "5", "dab_detr_tiny_parity.yaml"):
            self.assertIn(part, str(ctx.exception))
        # ... which maps them by name (with a 5-class teacher checkpoint).
        mapping = ["MODEL.KD.CLASS_MAPPING", "['*']"]
        weights5 = save_teacher(self.tmp, "MODEL.DETR.NUM_CLASSES", "5", name="teacher5")
        cfg = self.cfg(
            *names, *mapping, "MODEL.KD.TEACHER.WEIGHTS", weights5, teacher_opts=teacher_names
        )
        teacher = build_teacher(cfg)
        self.assertEqual(teacher.class_index, [1, 0, 4, 3])
        logits = torch.randn(2, 3, 5)
        self.assertTrue(torch.equal(teacher.map_logits(logits), logits[..., [1, 0, 4, 3]]))

    def test_input_format_flip(self):
        teacher = build_teacher(self.cfg(teacher_opts=["INPUT.FORMAT", "BGR"]))
        self.assertTrue(teacher.flip_channels)
        batch = synthetic_batch(1)
        flipped = [dict(batch[0], image=batch[0]["image"].flip(0))]
        expected = teacher.model.preprocess_image(flipped).tensor
        self.assertTrue(torch.equal(teacher.preprocess_image(batch).tensor, expected))
        with self.assertRaisesRegex(ValueError, "INPUT.FORMAT"):
            build_teacher(self.cfg(teacher_opts=["INPUT.FORMAT", "L"]))

    def test_init_student_from_teacher(self):
        teacher = build_teacher(self.cfg())
        torch.manual_seed(0)
        student = build_model(tiny_cfg("MODEL.DETR.NUM_QUERIES", "8"))
        before = {k: v.clone() for k, v in student.state_dict().items()}
        copied = init_student_from_teacher(student, teacher.model)
        t_state, s_state = teacher.model.state_dict(), student.state_dict()
        self.assertIn("transformer.decoder.layers.0.sa_qcontent_proj.weight", copied)
        self.assertIn("class_embed.weight", copied)
        self.assertFalse(any(k.startswith("backbone.") for k in copied))
        self.assertNotIn("refpoint_embed.weight", copied)  # 8 vs 6 queries
        for key in copied:
            self.assertTrue(torch.equal(s_state[key], t_state[key]), key)
        for key in ("refpoint_embed.weight", "backbone.res4.0.conv1.weight"):
            self.assertTrue(torch.equal(s_state[key], before[key]), key)


if __name__ == "__main__":
    unittest.main()
