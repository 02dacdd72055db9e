# Copyright (c) kd_detr contributors.
"""Baseline pairings (inconsistent, similar-foreground, similar-general) vs brute force."""
import itertools
import unittest

import torch

from kd_detr.distill import (
    foreground_weights,
    inconsistent_pairs,
    kd_detr_losses,
    similar_foreground_pairs,
    similar_general_pairs,
)
from kd_detr.modeling.matcher import HungarianMatcher

NUM_CLASSES = 3


def outputs(shape, gen):
    logits = torch.randn(*shape, NUM_CLASSES, generator=gen) * 2
    boxes = torch.rand(*shape, 4, generator=gen) * 0.5 + 0.25
    return {"pred_logits": logits, "pred_boxes": boxes}


def brute_force_match(matcher, logits, boxes, target):
    """{object: query} minimising the total cost over every one-to-one assignment."""
    cost = matcher.cost_matrix(logits, boxes, target["labels"], target["boxes"])
    num_q, num_t = cost.shape
    best, best_map = None, None
    if num_t <= num_q:
        candidates = [dict(enumerate(p)) for p in itertools.permutations(range(num_q), num_t)]
    else:
        candidates = [
            {t: q for q, t in enumerate(p)} for p in itertools.permutations(range(num_t), num_q)
        ]
    for mapping in candidates:
        total = sum(cost[q, t].item() for t, q in mapping.items())
        if best is None or total < best:
            best, best_map = total, mapping
    return best_map


class TestBaselines(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(0)
        self.student = outputs((2, 2, 4), gen)  # L = 2, B = 2, Q_s = 4
        self.teacher = outputs((2, 3), gen)  # B = 2, Q_t = 3 (final layer)
        self.targets = []
        for num in (2, 4):  # image 1 has more objects than teacher queries
            self.targets.append(
                {
                    "labels": torch.randint(NUM_CLASSES, (num,), generator=gen),
                    "boxes": torch.rand(num, 4, generator=gen) * 0.4 + 0.3,
                }
            )
        self.matcher = HungarianMatcher(cost_class=2.0, use_focal=True)

    def expected(self, general):
        s, t = self.student, self.teacher
        rows_s, rows_t, extra_s, extra_t = [], [], [], []
        for b, target in enumerate(self.targets):
            t_map = brute_force_match(self.matcher, t["pred_logits"][b], t["pred_boxes"][b], target)
            s_maps = [
                brute_force_match(
                    self.matcher, s["pred_logits"][lv, b], s["pred_boxes"][lv, b], target
                )
                for lv in range(2)
            ]
            for obj in range(len(target["labels"])):
                if obj in t_map and all(obj in m for m in s_maps):
                    rows_t.append([t[k][b, t_map[obj]] for k in ("pred_logits", "pred_boxes")])
                    rows_s.append(
                        [
                            torch.stack([s[k][lv, b, s_maps[lv][obj]] for lv in range(2)])
                            for k in ("pred_logits", "pred_boxes")
                        ]
                    )
            t_free = [q for q in range(3) if q not in t_map.values()]
            s_free = [[q for q in range(4) if q not in m.values()] for m in s_maps]
            if general and t_free and all(s_free):
                extra_t.append([t[k][b, t_free].mean(0) for k in ("pred_logits", "pred_boxes")])
                extra_s.append(
                    [
                        torch.stack([s[k][lv, b, s_free[lv]].mean(0) for lv in range(2)])
                        for k in ("pred_logits", "pred_boxes")
                    ]
                )
        rows_s, rows_t = rows_s + extra_s, rows_t + extra_t
        return (
            [torch.stack([r[k] for r in rows_s], dim=1)[:, None] for k in range(2)],
            [torch.stack([r[k] for r in rows_t])[None] for k in range(2)],
        )

    def check(self, fn, general):
        student, teacher = fn(self.student, self.teacher, self.targets, self.matcher)
        exp_s, exp_t = self.expected(general)
        for k, key in enumerate(("pred_logits", "pred_boxes")):
            torch.testing.assert_close(student[key], exp_s[k])
            torch.testing.assert_close(teacher[key], exp_t[k])
        return student, teacher

    def test_similar_foreground(self):
        student, teacher = self.check(similar_foreground_pairs, general=False)
        # image 0: 2 objects; image 1: 3 of 4 objects matched by the 3-query teacher
        self.assertEqual(student["pred_logits"].shape, (2, 1, 5, NUM_CLASSES))
        self.assertEqual(teacher["pred_boxes"].shape, (1, 5, 4))

    def test_similar_general(self):
        student, teacher = self.check(similar_general_pairs, general=True)
        # + one background pair for image 0 only (the teacher has no unmatched query in image 1)
        self.assertEqual(student["pred_logits"].shape, (2, 1, 6, NUM_CLASSES))
        self.assertEqual(teacher["pred_logits"].shape, (1, 6, NUM_CLASSES))

    def test_inconsistent(self):
        teacher_layers = {k: torch.stack([v, v + 1]) for k, v in self.teacher.items()}
        for teacher in (self.teacher, teacher_layers):  # final layer, or all layers (last used)
            student, paired = inconsistent_pairs(self.student, teacher)
            for key in ("pred_logits", "pred_boxes"):
                self.assertEqual(student[key].shape[:3], (2, 2, 3))  # min(Q_s = 4, Q_t = 3)
                for lv, b, q in itertools.product(range(2), range(2), range(3)):
                    torch.testing.assert_close(student[key][lv, b, q], self.student[key][lv, b, q])
                    last = teacher[key] if teacher[key].dim() == 3 else teacher[key][-1]
                    torch.testing.assert_close(paired[key][b, q], last[b, q])

    def test_same_losses_apply(self):
        student = {k: v.clone().requires_grad_() for k, v in self.student.items()}
        teacher = {k: v.clone().requires_grad_() for k, v in self.teacher.items()}
        for fn in (similar_foreground_pairs, similar_general_pairs):
            s, t = fn(student, teacher, self.targets, self.matcher)
            weights = foreground_weights(t["pred_logits"], softmax=False)
            losses = kd_detr_losses(s, t, weights, "similar", mode="normalized")
            self.assertEqual(len(losses), 6)  # 3 terms x 2 student layers
            total = sum(losses.values())
            grads = torch.autograd.grad(
                total, list(student.values()) + list(teacher.values()), allow_unused=True
            )
            self.assertTrue(all(g is not None for g in grads[:2]))
            self.assertTrue(all(g is None for g in grads[2:]))


if __name__ == "__main__":
    unittest.main()
