# Copyright (c) kd_detr contributors.
"""Incremental-DETR's distillation: KDDETRLoss's class term on the base classes, the masked
encoder-feature term against float64 computations, gradients, a tiny KD step, bad input."""
import math
import os
import tempfile
import unittest

import torch

from kd_detr.distill import KDContext, MaskedFeatureKDLoss, build_kd_losses, kd_detr_losses
from kd_detr.distill.losses import KDDETRLoss

from .kd_helpers import TINY_CONFIG, kd_cfg, run_kd_step, save_teacher, tiny_cfg
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()


def _pair(num_logits, seed=0, layers=2, batch=2, points=5):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, normal=True):
        draw = torch.randn if normal else torch.rand
        return draw(*shape, generator=gen, dtype=torch.float64)

    student = {
        "pred_logits": rand(layers, batch, points, num_logits),
        "pred_boxes": rand(layers, batch, points, 4, normal=False) * 0.5 + 0.2,
    }
    teacher = {
        "pred_logits": rand(batch, points, num_logits),
        "pred_boxes": rand(batch, points, 4, normal=False) * 0.5 + 0.2,
    }
    return student, teacher, rand(batch, points, normal=False)


def _hand_cls(s_logits, t_logits, weights, keep, temperature, sigmoid):
    """Float64 class term of one layer, point by point, on the logits ``keep``."""
    total, norm = 0.0, float(weights.sum())
    for b in range(t_logits.shape[0]):
        for m in range(t_logits.shape[1]):
            zs = [float(s_logits[b, m, c]) / temperature for c in keep]
            zt = [float(t_logits[b, m, c]) / temperature for c in keep]
            if sigmoid:
                kl = 0.0
                for a, t in zip(zs, zt):
                    qs, qt = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-t))
                    kl += qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs))
            else:
                ps = [math.exp(a) / sum(math.exp(x) for x in zs) for a in zs]
                pt = [math.exp(t) / sum(math.exp(x) for x in zt) for t in zt]
                kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
            total += float(weights[b, m]) * kl * temperature**2
    return total / norm


class TestBaseClassRestriction(unittest.TestCase):
    def test_class_term_against_hand_computation(self):
        # 4 classes, base {0, 2}: sigmoid keeps logits 0, 2; softmax also the background (4).
        for mode, num_logits, keep in (("sigmoid", 4, [0, 2]), ("normalized", 5, [0, 2, 4])):
            with self.subTest(mode=mode):
                cfg = tiny_cfg("MODEL.KD.MODE", mode, "MODEL.KD.BASE_CLASSES", "[2, 0]",
                               "MODEL.DETR.USE_FOCAL_LOSS", str(num_logits == 4))  # fmt: skip
                term = KDDETRLoss(cfg)
                student, teacher, weights = _pair(num_logits)
                losses = term.pair_losses(student, teacher, weights, "general")
                for layer, key in ((0, "loss_kd_cls_general_0"), (1, "loss_kd_cls_general")):
                    expected = _hand_cls(student["pred_logits"][layer], teacher["pred_logits"],
                                         weights, keep, 10.0, mode == "sigmoid")  # fmt: skip
                    self.assertAlmostEqual(losses[key].item(), expected, places=5)
                # The novel logits do not matter; a base logit does.
                moved = {**teacher, "pred_logits": teacher["pred_logits"].clone()}
                moved["pred_logits"][..., 3] += 5.0
                again = term.pair_losses(student, moved, weights, "general")
                self.assertEqual(again["loss_kd_cls_general"], losses["loss_kd_cls_general"])
                moved["pred_logits"][..., 0] += 5.0
                again = term.pair_losses(student, moved, weights, "general")
                self.assertNotAlmostEqual(
                    again["loss_kd_cls_general"].item(), losses["loss_kd_cls_general"].item(), 3
                )
                # Box terms do not depend on the restriction.
                full = kd_detr_losses(student, teacher, weights, "general", mode=mode)
                self.assertEqual(full["loss_kd_bbox_general"], losses["loss_kd_bbox_general"])

    def test_base_class_ids_out_of_range(self):
        for value, message in (("[0, 4]", "has ids \\[4\\] outside \\[0, 3\\]"),
                               ("[-1]", "outside"), ("[1, 1]", "repeats")):  # fmt: skip
            cfg = tiny_cfg("MODEL.KD.BASE_CLASSES", value)
            with self.subTest(value=value), self.assertRaisesRegex(
                ValueError, f"MODEL.KD.BASE_CLASSES .*{message}"
            ):
                build_kd_losses(cfg)

    def test_masked_term_needs_base_classes(self):
        cfg = tiny_cfg("MODEL.KD.LOSSES", "['MaskedFeatureKDLoss']")
        with self.assertRaisesRegex(ValueError, "MaskedFeatureKDLoss needs MODEL.KD.BASE_CLASSES"):
            build_kd_losses(cfg)


def _masked_reference(s_mem, t_mem, targets, sizes, shapes, padded, base):
    """Float64 loss cell by cell: 1 / (2 N) sum over kept cells of sum_k (f_s - f_t)^2."""
    total, count = 0.0, 0
    for b, (img_h, img_w) in enumerate(sizes):
        boxes = [
            [(cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w, (cy + h / 2) * img_h]
            for (cx, cy, w, h), label in zip(targets[b]["boxes"].tolist(),
                                             targets[b]["labels"].tolist())
            if label not in base
        ]  # fmt: skip
        offset = 0
        for h, w in shapes:
            stride = padded[0] / h
            for y in range(h):
                for x in range(w):
                    index = offset + y * w + x
                    padding = y * stride >= img_h or x * stride >= img_w
                    novel = any(
                        x1 < (x + 1) * stride and x2 > x * stride
                        and y1 < (y + 1) * stride and y2 > y * stride
                        for x1, y1, x2, y2 in boxes
                    )  # fmt: skip
                    if padding or novel:
                        continue
                    diff = (s_mem[b, index] - t_mem[b, index]).detach().double()
                    total += float((diff * diff).sum())
                    count += 1
            offset += h * w
    return total / (2 * count), count


class TestMaskedFeature(unittest.TestCase):
    def _context(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        sizes = [(64, 48), (40, 64)]  # padded to 64 x 64 (divisibility 32): stride 16 and 32
        shapes = [(4, 4), (2, 2)]
        padded = (64, 64)
        pad = []
        for img_h, img_w in sizes:
            cells = []
            for h, w in shapes:
                s = padded[0] / h
                cells += [y * s >= img_h or x * s >= img_w for y in range(h) for x in range(w)]
            pad.append(cells)
        padding = torch.tensor(pad)
        s_mem = torch.randn(2, 20, 8, generator=gen).requires_grad_()
        t_mem = torch.randn(2, 20, 8, generator=gen).requires_grad_()
        targets = [
            {"labels": torch.tensor([3, 0]),
             "boxes": torch.tensor([[0.3, 0.3, 0.3, 0.25], [0.7, 0.7, 0.3, 0.3]])},
            {"labels": torch.tensor([1, 3, 2]),
             "boxes": torch.tensor([[0.2, 0.5, 0.2, 0.5], [0.8, 0.3, 0.2, 0.3],
                                    [0.5, 0.5, 0.9, 0.9]])},
        ]  # fmt: skip

        def outputs(mem):
            return {"encoder": {"memory": mem, "mask": padding, "spatial_shapes": shapes}}

        context = KDContext(
            iteration=0, batched_inputs=[], image_sizes=sizes, student_outputs=outputs(s_mem),
            teacher_outputs=outputs(t_mem), teacher_softmax=False, targets=targets,
        )  # fmt: skip
        return context, s_mem, t_mem, targets, sizes, shapes, padded

    def test_loss_against_float64_and_gradients(self):
        context, s_mem, t_mem, targets, sizes, shapes, padded = self._context()
        term = MaskedFeatureKDLoss(base_classes=[0, 1, 2], weight=0.5)
        term.size_divisibility = 32
        loss = term(context)["loss_kd_masked_feature"]
        expected, count = _masked_reference(s_mem, t_mem, targets, sizes, shapes, padded, {0, 1, 2})
        self.assertLess(count, 40 - 4)  # novel boxes and padding removed cells
        self.assertAlmostEqual(loss.item(), 0.5 * expected, places=5)
        loss.backward()
        self.assertIsNone(t_mem.grad)  # the teacher gets no gradient
        touched = s_mem.grad.abs().sum(-1) > 0
        self.assertEqual(int(touched.sum()), count)  # only the kept cells
        # Base boxes are not masked: with every class novel, fewer cells remain.
        all_novel = MaskedFeatureKDLoss(base_classes=[5], weight=1.0)
        all_novel.size_divisibility = 32
        fewer = _masked_reference(s_mem, t_mem, targets, sizes, shapes, padded, {5})[1]
        self.assertLess(fewer, count)
        self.assertAlmostEqual(
            all_novel(context)["loss_kd_masked_feature"].item(),
            _masked_reference(s_mem, t_mem, targets, sizes, shapes, padded, {5})[0], places=5,
        )


class TestIncrementalKDStep(unittest.TestCase):
    def test_tiny_step_with_both_terms(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            cfg = kd_cfg(os.path.join(tmp, "out"), weights,
                         "MODEL.KD.LOSSES", "['KDDETRLoss', 'MaskedFeatureKDLoss']",
                         "MODEL.KD.BASE_CLASSES", "[0, 1, 2]")  # fmt: skip
            teacher_before = torch.load(weights, weights_only=False)["model"]
            trainer, losses, t_calls, s_calls = run_kd_step(cfg, TINY_CONFIG, [])
        self.assertGreater(losses["loss_kd_masked_feature"], 0)
        self.assertGreater(losses["loss_kd_cls_general"], 0)
        self.assertTrue(all(not c["grad"] for c in t_calls))
        for name, value in trainer.teacher.model.state_dict().items():
            self.assertTrue(torch.equal(value, teacher_before[name]), name)
        self.assertFalse(any(p.requires_grad for p in trainer.teacher.parameters()))
        term = trainer.kd_losses[1]
        self.assertEqual((term.base_classes, term.size_divisibility), ([0, 1, 2], 32))


if __name__ == "__main__":
    unittest.main()
