# Copyright (c) kd_detr contributors.
"""Teacher -> student class mapping by name, and mapped teacher logits."""
import unittest

import torch

from kd_detr.distill import build_class_mapping, foreground_weights, map_teacher_logits

TEACHER = ["person", "bicycle", "car", "motorcycle", "airplane", "dog"]


class TestBuildClassMapping(unittest.TestCase):
    def test_identical_lists_need_no_mapping(self):
        self.assertIsNone(build_class_mapping(TEACHER, list(TEACHER)))

    def test_subset_by_name_and_renames(self):
        student = ["aeroplane", "person", "motorbike", "dog"]
        entries = ["*", "aeroplane:airplane", " motorbike : motorcycle "]
        self.assertEqual(build_class_mapping(student, TEACHER, entries), [4, 0, 3, 5])
        explicit = ["aeroplane:airplane", "person:person", "motorbike:motorcycle", "dog:dog"]
        self.assertEqual(build_class_mapping(student, TEACHER, explicit), [4, 0, 3, 5])
        self.assertEqual(build_class_mapping(TEACHER[::-1], TEACHER, ["*"]), [5, 4, 3, 2, 1, 0])

    def test_differing_lists_without_mapping(self):
        with self.assertRaises(ValueError) as ctx:
            build_class_mapping(["person", "aeroplane"], TEACHER)
        message = str(ctx.exception)
        for part in ("2 classes", "6", "'aeroplane'", "'airplane'", "MODEL.KD.CLASS_MAPPING", "*"):
            self.assertIn(part, message)
        with self.assertRaisesRegex(ValueError, "different order"):
            build_class_mapping(TEACHER[::-1], TEACHER)
        with self.assertRaisesRegex(ValueError, "teacher has 4 extra classes"):
            build_class_mapping(["person", "dog"], TEACHER)

    def test_unmatched_classes(self):
        with self.assertRaises(ValueError) as ctx:
            build_class_mapping(["person", "aeroplane", "tvmonitor"], TEACHER, ["*"])
        message = str(ctx.exception)
        for part in ("2 of the student's classes", "'aeroplane'", "'tvmonitor'", "3 classes"):
            self.assertIn(part, message)
        with self.assertRaisesRegex(ValueError, "add '\\*'"):
            build_class_mapping(["person", "dog"], TEACHER, ["person:person"])

    def test_bad_entries(self):
        cases = [
            (["person:person:x"], "malformed"),
            (["person"], "malformed"),
            (["cat:person"], "unknown student class 'cat'"),
            (
                ["person:Person"],
                "unknown teacher class 'Person' \\(closest teacher class: 'person'",
            ),
            (["person:person", "person:dog"], "mapped twice"),
            (["person:person", "dog:person"], "several student classes"),
        ]
        for entries, pattern in cases:
            with self.subTest(entries=entries):
                with self.assertRaisesRegex(ValueError, pattern):
                    build_class_mapping(["person", "dog"], TEACHER, entries)
        with self.assertRaisesRegex(ValueError, "duplicate student"):
            build_class_mapping(["dog", "dog"], TEACHER)


class TestMapTeacherLogits(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(0)
        self.index = [4, 0, 3]
        self.sigmoid = torch.randn(2, 5, 6, generator=gen)
        self.softmax = torch.randn(2, 5, 7, generator=gen) * 3  # 6 classes + background

    def test_identity_and_sigmoid(self):
        self.assertIs(map_teacher_logits(self.sigmoid, None, softmax=False), self.sigmoid)
        mapped = map_teacher_logits(self.sigmoid, self.index, softmax=False)
        torch.testing.assert_close(mapped, self.sigmoid[..., self.index])

    def test_softmax_folds_unmapped_classes_into_background(self):
        for temperature in (1.0, 10.0):
            mapped = map_teacher_logits(self.softmax, self.index, True, temperature=temperature)
            self.assertEqual(mapped.shape, (2, 5, 4))
            prob = (mapped / temperature).softmax(-1)
            full = (self.softmax / temperature).softmax(-1)
            torch.testing.assert_close(prob[..., :3], full[..., self.index])
            unmapped = [1, 2, 5, 6]  # other classes and the background
            torch.testing.assert_close(prob[..., 3], full[..., unmapped].sum(-1))
        plain = map_teacher_logits(self.softmax, self.index, True, fold_unmapped=False)
        torch.testing.assert_close(plain, self.softmax[..., [4, 0, 3, 6]])

    def test_weights_of_mapped_classes(self):
        weights = foreground_weights(self.softmax, softmax=True, class_index=self.index)
        torch.testing.assert_close(weights, self.softmax.softmax(-1)[..., self.index].amax(-1))
        weights = foreground_weights(self.sigmoid, softmax=False, class_index=self.index)
        torch.testing.assert_close(weights, self.sigmoid[..., self.index].sigmoid().amax(-1))


if __name__ == "__main__":
    unittest.main()
