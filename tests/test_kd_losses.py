# Copyright (c) kd_detr contributors.
"""KD-DETR losses and foreground weights against values computed by hand (tiny inputs)."""
import math
import unittest
from unittest import mock

import numpy as np
import torch

from detectron2.config import get_cfg

from kd_detr.distill import (
    KD_LOSS_REGISTRY,
    KDDETRLoss,
    add_kd_config,
    build_kd_losses,
    final_layer_targets,
    foreground_weights,
    kd_detr_losses,
    sigmoid_foreground_weights,
    softmax_foreground_weights,
)

T = 10.0


def make_inputs(num_layers=2, bsz=1, num_points=2, num_logits=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(num_layers, bsz, num_points, num_logits, generator=gen) * 4
    t_logits = torch.randn(bsz, num_points, num_logits, generator=gen) * 4
    s_boxes = torch.rand(num_layers, bsz, num_points, 4, generator=gen) * 0.4 + 0.3
    t_boxes = torch.rand(bsz, num_points, 4, generator=gen) * 0.4 + 0.3
    weights = torch.rand(bsz, num_points, generator=gen)
    return s_logits, s_boxes, t_logits, t_boxes, weights


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_giou(a, b):
    """GIoU of two cxcywh boxes, by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    enclosing = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (enclosing - union) / enclosing


def reference(s_logits, s_boxes, t_logits, t_boxes, weights, mode, layer, norm=None):
    """(cls, l1, giou) of one student layer with explicit loops in float64."""
    sl, sb = s_logits[layer].double().numpy(), s_boxes[layer].double().numpy()
    tl, tb, w = t_logits.double().numpy(), t_boxes.double().numpy(), weights.double().numpy()
    num_logits = tl.shape[-1]
    cls = l1 = giou = 0.0
    for b in range(tl.shape[0]):
        for i in range(tl.shape[1]):
            kl = 0.0
            if mode == "sigmoid":
                qs, qt = np_sigmoid(sl[b, i] / T), np_sigmoid(tl[b, i] / T)
                for c in range(num_logits):
                    kl += qt[c] * math.log(qt[c] / qs[c])
                    kl += (1 - qt[c]) * math.log((1 - qt[c]) / (1 - qs[c]))
            else:
                ps, pt = np_softmax(sl[b, i] / T), np_softmax(tl[b, i] / T)
                for c in range(num_logits):
                    kl += pt[c] * math.log(pt[c] / ps[c])
                if mode == "official":
                    kl /= num_logits
            cls += w[b, i] * T**2 * kl
            l1 += w[b, i] * np.abs(sb[b, i] - tb[b, i]).mean()
            giou += w[b, i] * (1 - np_giou(sb[b, i], tb[b, i]))
    norm = w.sum() if norm is None else norm
    if mode != "official":
        cls /= norm
    return cls, l1 / norm, giou / norm


class TestKDDETRLosses(unittest.TestCase):
    def check(self, mode, **kwargs):
        inputs = make_inputs(**kwargs)
        s_logits, s_boxes, t_logits, t_boxes, weights = inputs
        out = kd_detr_losses(
            {"pred_logits": s_logits, "pred_boxes": s_boxes},
            {"pred_logits": t_logits, "pred_boxes": t_boxes},
            weights,
            "general",
            mode=mode,
            temperature=T,
            cls_weight=1.0,
            l1_weight=5.0,
            giou_weight=2.0,
        )
        self.assertEqual(len(out), 3 * s_logits.shape[0])
        for layer in range(s_logits.shape[0]):
            suffix = "general" if layer == s_logits.shape[0] - 1 else f"general_{layer}"
            cls, l1, giou = reference(*inputs, mode, layer)
            self.assertAlmostEqual(out[f"loss_kd_cls_{suffix}"].item(), cls, delta=1e-5 * cls)
            self.assertAlmostEqual(out[f"loss_kd_bbox_{suffix}"].item(), 5 * l1, delta=1e-5)
            self.assertAlmostEqual(out[f"loss_kd_giou_{suffix}"].item(), 2 * giou, delta=1e-5)
            self.assertGreater(cls, 0)

    def test_official(self):
        self.check("official")
        self.check("official", bsz=2, num_points=3, num_logits=4, seed=1)

    def test_normalized(self):
        self.check("normalized")
        self.check("normalized", bsz=2, num_points=3, num_logits=4, seed=1)

    def test_sigmoid(self):
        self.check("sigmoid")
        self.check("sigmoid", bsz=2, num_points=3, num_logits=4, seed=1)

    def test_official_class_term_is_a_sum_over_points(self):
        # The official quirk: duplicating every point doubles the class term, not the box terms.
        s_logits, s_boxes, t_logits, t_boxes, weights = make_inputs()
        one = kd_detr_losses(
            {"pred_logits": s_logits, "pred_boxes": s_boxes},
            {"pred_logits": t_logits, "pred_boxes": t_boxes},
            weights,
            "g",
        )
        two = kd_detr_losses(
            {"pred_logits": s_logits.repeat(1, 2, 1, 1), "pred_boxes": s_boxes.repeat(1, 2, 1, 1)},
            {"pred_logits": t_logits.repeat(2, 1, 1), "pred_boxes": t_boxes.repeat(2, 1, 1)},
            weights.repeat(2, 1),
            "g",
        )
        torch.testing.assert_close(two["loss_kd_cls_g"], 2 * one["loss_kd_cls_g"])
        torch.testing.assert_close(two["loss_kd_bbox_g"], one["loss_kd_bbox_g"])

    def test_zero_when_student_equals_teacher(self):
        _, _, t_logits, t_boxes, weights = make_inputs()
        student = {"pred_logits": t_logits[None].repeat(3, 1, 1, 1), "pred_boxes": t_boxes[None]}
        student["pred_boxes"] = student["pred_boxes"].repeat(3, 1, 1, 1)
        teacher = {"pred_logits": t_logits, "pred_boxes": t_boxes}
        for mode in ("official", "normalized", "sigmoid"):
            for value in kd_detr_losses(student, teacher, weights, "g", mode=mode).values():
                self.assertLess(abs(value.item()), 1e-5)

    def test_gradient_reaches_student_only(self):
        tensors = [t.clone().requires_grad_() for t in make_inputs()]
        s_logits, s_boxes, t_logits, t_boxes, weights = tensors
        for mode in ("official", "normalized", "sigmoid"):
            out = kd_detr_losses(
                {"pred_logits": s_logits, "pred_boxes": s_boxes},
                {"pred_logits": t_logits, "pred_boxes": t_boxes},
                weights,
                "g",
                mode=mode,
            )
            grads = torch.autograd.grad(sum(out.values()), tensors, allow_unused=True)
            self.assertTrue(all(g is not None and g.abs().sum() > 0 for g in grads[:2]))
            self.assertTrue(all(g is None for g in grads[2:]))

    def test_all_reduce_two_ranks_equals_one_rank_with_all_points(self):
        a = make_inputs(num_points=2, seed=2)
        b = make_inputs(num_points=3, seed=3)

        def run(inputs, mode):
            s_logits, s_boxes, t_logits, t_boxes, weights = inputs
            return kd_detr_losses(
                {"pred_logits": s_logits, "pred_boxes": s_boxes},
                {"pred_logits": t_logits, "pred_boxes": t_boxes},
                weights,
                "g",
                mode=mode,
            )

        both = [torch.cat([x, y], dim=-2 if x.dim() > 2 else -1) for x, y in zip(a, b)]
        for mode in ("normalized", "sigmoid"):
            per_rank = []
            for mine, other in ((a, b), (b, a)):
                other_sum = other[-1].sum()
                with mock.patch("kd_detr.distill.losses.comm.get_world_size", return_value=2):
                    with mock.patch(
                        "kd_detr.distill.losses.dist.all_reduce",
                        side_effect=lambda t, s=other_sum: t.add_(s),
                    ) as all_reduce:
                        per_rank.append(run(mine, mode))
                self.assertEqual(all_reduce.call_count, 1)  # one collective per group
            single = run(both, mode)
            for key, value in single.items():
                torch.testing.assert_close((per_rank[0][key] + per_rank[1][key]) / 2, value)

    def test_empty_group_and_default_weights(self):
        s_logits, s_boxes, t_logits, t_boxes, _ = make_inputs(num_points=0)
        out = kd_detr_losses(
            {"pred_logits": s_logits, "pred_boxes": s_boxes},
            {"pred_logits": t_logits, "pred_boxes": t_boxes},
            None,
            "g",
            mode="normalized",
        )
        self.assertTrue(all(v.item() == 0 for v in out.values()))
        # (B, M, .) student tensors count as one layer; None weights are ones.
        s_logits, s_boxes, t_logits, t_boxes, _ = make_inputs(num_layers=1)
        student = {"pred_logits": s_logits[0], "pred_boxes": s_boxes[0]}
        teacher = {"pred_logits": t_logits, "pred_boxes": t_boxes}
        default = kd_detr_losses(student, teacher, None, "g")
        ones = kd_detr_losses(student, teacher, torch.ones(t_logits.shape[:2]), "g")
        self.assertEqual(sorted(default), ["loss_kd_bbox_g", "loss_kd_cls_g", "loss_kd_giou_g"])
        for key, value in default.items():
            torch.testing.assert_close(value, ones[key])

    def test_shape_mismatch_is_an_error(self):
        s_logits, s_boxes, t_logits, t_boxes, weights = make_inputs()
        with self.assertRaisesRegex(ValueError, "CLASS_MAPPING"):
            kd_detr_losses(
                {"pred_logits": s_logits[..., :2], "pred_boxes": s_boxes},
                {"pred_logits": t_logits, "pred_boxes": t_boxes},
                weights,
                "g",
            )

    def test_registry_and_config(self):
        cfg = get_cfg()
        add_kd_config(cfg)
        self.assertEqual(cfg.MODEL.KD.LOSSES, ["KDDETRLoss"])
        cfg.MODEL.KD.MODE, cfg.MODEL.KD.CLS_WEIGHT = "normalized", 3.0
        (loss,) = build_kd_losses(cfg)
        self.assertIs(type(loss), KD_LOSS_REGISTRY.get("KDDETRLoss"))
        self.assertEqual((loss.mode, loss.temperature, loss.cls_weight), ("normalized", 10.0, 3.0))
        s_logits, s_boxes, t_logits, t_boxes, weights = make_inputs()
        out = loss.pair_losses(
            {"pred_logits": s_logits, "pred_boxes": s_boxes},
            final_layer_targets({"pred_logits": t_logits[None], "pred_boxes": t_boxes[None]}),
            weights,
            "specific",
        )
        cls, _, _ = reference(s_logits, s_boxes, t_logits, t_boxes, weights, "normalized", 1)
        self.assertAlmostEqual(out["loss_kd_cls_specific"].item(), 3 * cls, delta=1e-4)
        with self.assertRaises(ValueError):
            KDDETRLoss(mode="unknown")


class TestForegroundWeights(unittest.TestCase):
    def test_sigmoid_and_softmax(self):
        logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * 3
        logits.requires_grad_()
        sig, soft = sigmoid_foreground_weights(logits), softmax_foreground_weights(logits)
        sub = softmax_foreground_weights(logits, class_index=[2, 0])
        z = logits.detach().double().numpy()
        for b in range(2):
            for i in range(3):
                p = np_softmax(z[b, i])
                self.assertAlmostEqual(sig[b, i].item(), max(np_sigmoid(z[b, i])), places=6)
                self.assertAlmostEqual(soft[b, i].item(), max(p[:-1]), places=6)  # no background
                self.assertAlmostEqual(sub[b, i].item(), max(p[2], p[0]), places=6)
        for w in (sig, soft, sub, foreground_weights(logits, softmax=False)):
            self.assertFalse(w.requires_grad)
        torch.testing.assert_close(foreground_weights(logits, softmax=True), soft)


if __name__ == "__main__":
    unittest.main()
