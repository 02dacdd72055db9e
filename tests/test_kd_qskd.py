# Copyright (c) kd_detr contributors.
"""QSKD: group query selection, LAPD (local alignment prediction KD) and AGFD (attention-guided
feature KD) against independent float64 computations (numpy, scipy's linear_sum_assignment) for
sigmoid and softmax models; gradients to the student (and the adapter) only; start-up errors
naming the method, the model and what is missing; KD steps on the demo pair and on vanilla
(softmax) DETR; the adapter in the optimizer and the checkpoint."""
import math
import tempfile
import unittest

import numpy as np
import torch

from kd_detr.distill import QSKDLoss, select_queries

from .kd_feature_helpers import demo_pair_trainer, logged_losses
from .kd_helpers import tiny_cfg
from .kd_query_helpers import (
    NotADETR,
    StandInDETR,
    check_adapter_resume,
    detr_trainer,
    make_query_kd_inputs,
    np_,
    np_gt_match,
    np_iou_giou,
    np_pair_sums,
    np_soft_match,
    query_context,
)
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

B, LS, LT, Q, N, DS, DT, S = 2, 2, 3, 7, 6, 3, 4, 5


def boxes(gen, *shape):
    """Large cxcywh boxes around the centre: many overlap the objects (GIoU > 0)."""
    centre = 0.3 + 0.4 * torch.rand(*shape, 2, generator=gen)
    size = 0.25 + 0.35 * torch.rand(*shape, 2, generator=gen)
    return torch.cat([centre, size], -1)


def make_inputs(seed, num_logits):
    return make_query_kd_inputs(seed, shapes=(B, LS, LT, Q, N, DS, DT, S), num_logits=num_logits,
                                padded_from=4, target_counts=(3, 2), num_classes=3,
                                box_sampler=boxes)  # fmt: skip


def np_select(logits, boxes_, labels, gt, softmax, threshold=0.0):
    """(matched query -> object, hard negatives with their best GIoU, matched GIoU)."""
    rows, cols = np_gt_match(logits, boxes_, labels, gt, softmax)
    matched = dict(zip(rows.tolist(), cols.tolist()))
    hard = []
    for i in range(len(boxes_)):
        best = max(np_iou_giou(boxes_[i], g)[1] for g in gt)
        if i not in matched and best > threshold:
            hard.append((i, best))
    return matched, hard


def reference(term, student, teacher, s_mem, t_mem, padding, targets, softmax):
    """Every loss of QSKDLoss, and the number of hard-negative pairs."""
    w = term.adapter.weight.detach().double().numpy()
    adapted = np_(s_mem) @ w.T + term.adapter.bias.detach().double().numpy()
    t_feat, valid = np_(t_mem), ~padding.numpy()
    s_logits, s_boxes = np_(student["pred_logits"]), np_(student["pred_boxes"])
    t_logits, t_boxes = np_(teacher["pred_logits"]), np_(teacher["pred_boxes"])
    out, num_hard = {}, 0
    for layer in range(LS):
        t = layer + LT - LS
        sums, total = np.zeros(4), 0.0
        for b in range(B):
            labels, gt = targets[b]["labels"].numpy(), targets[b]["boxes"].double().numpy()
            s_pos, s_hard = np_select(s_logits[layer, b], s_boxes[layer, b], labels, gt, softmax)
            t_pos, t_hard = np_select(t_logits[t, b], t_boxes[t, b], labels, gt, softmax)
            t_of = {o: q for q, o in t_pos.items()}
            pairs = [(q, t_of[o]) for q, o in s_pos.items() if o in t_of]
            if s_hard and t_hard:
                si, ti = [i for i, _ in s_hard], [i for i, _ in t_hard]
                rows, cols = np_soft_match(
                    s_logits[layer, b, si], s_boxes[layer, b, si], t_logits[t, b, ti],
                    t_boxes[t, b, ti], softmax,
                )
                pairs += [(si[r], ti[c]) for r, c in zip(rows, cols)]
                num_hard += len(rows)
            sums += np_pair_sums(s_logits[layer, b], s_boxes[layer, b], t_logits[t, b],
                                 t_boxes[t, b], pairs, softmax)  # fmt: skip
            selected = [(q, np_iou_giou(t_boxes[t, b, q], gt[o])[1]) for q, o in t_pos.items()]
            selected += t_hard
            mask = np.zeros(S)
            for q, giou in selected:
                h = np_(teacher["hidden_states"])[t, b, q]
                logits = np.array([h @ t_feat[b, s] / np.sqrt(DT) if valid[b, s] else -np.inf
                                   for s in range(S)])  # fmt: skip
                attention = np.exp(logits - logits.max())
                mask += (1 + giou) * attention / attention.sum() / len(selected)
            mask /= max(mask.max(), 0.01)
            for s in range(S):
                if valid[b, s]:
                    total += ((mask[s] * (t_feat[b, s] - adapted[b, s])) ** 2).sum()
        suffix = "" if layer == LS - 1 else f"_{layer}"
        n = max(sums[3], 1.0)
        for name, weight, value in zip(("cls", "l1", "giou"), (1.0, 5.0, 2.0), sums[:3]):
            out[f"loss_kd_qskd_{name}{suffix}"] = weight * value / n
        out[f"loss_kd_qskd_agfd{suffix}"] = 100.0 * total / (valid.sum() * DT)
    return out, num_hard


def bound_term(softmax, **kwargs):
    term = QSKDLoss(softmax=softmax, **kwargs)
    classes = 3
    term.bind(StandInDETR(DS, not softmax, num_classes=classes),
              StandInDETR(DT, not softmax, num_classes=classes))  # fmt: skip
    return term


class TestQSKDFormulas(unittest.TestCase):
    def test_against_float64(self):
        for softmax in (False, True):
            student, teacher, s_mem, t_mem, padding, targets = make_inputs(0, 3 + int(softmax))
            term = bound_term(softmax)
            self.assertEqual(term.inputs, {"detections", "targets", "encoder_memory"})
            got = term(query_context(student, teacher, targets, s_mem, t_mem, padding))
            expected, num_hard = reference(
                term, student, teacher, s_mem, t_mem, padding, targets, softmax
            )
            self.assertGreater(num_hard, 0)  # the hard-negative branch is exercised
            with self.subTest(softmax=softmax):
                self.assertEqual(set(got), set(expected))
                for key, value in expected.items():
                    self.assertAlmostEqual(got[key].item(), value, delta=2e-6 * max(1, value),
                                           msg=key)  # fmt: skip

    def test_select_queries(self):
        # object (0.5, 0.5, 0.2, 0.2); query 0 matched; 1 overlaps (GIoU > 0); 2 touches nothing
        # nearby (GIoU < 0); 3 overlaps but only slightly (GIoU < 0).
        preds = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2],
                              [0.9, 0.9, 0.1, 0.1], [0.62, 0.5, 0.1, 0.1]])  # fmt: skip
        target = {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
        matching = (torch.tensor([0]), torch.tensor([0]))
        hard, hard_giou, pos_giou = select_queries(preds, target, matching, 0.0)
        self.assertEqual(hard.tolist(), [1])
        expected = np_iou_giou(preds[1].numpy(), [0.5, 0.5, 0.2, 0.2])[1]
        self.assertAlmostEqual(hard_giou.item(), expected, places=6)
        self.assertAlmostEqual(pos_giou.item(), 1.0, places=6)
        self.assertLess(np_iou_giou(preds[3].numpy(), [0.5, 0.5, 0.2, 0.2])[1], 0)
        hard, _, _ = select_queries(preds, target, matching, -0.5)
        self.assertEqual(hard.tolist(), [1, 3])
        hard, _, _ = select_queries(preds, {"boxes": torch.zeros(0, 4)}, matching, 0.0)
        self.assertEqual(len(hard), 0)

    def test_gradients_reach_the_student_only(self):
        student, teacher, s_mem, t_mem, padding, targets = make_inputs(1, 3)
        term = bound_term(False)
        context = query_context(student, teacher, targets, s_mem, t_mem, padding)
        context.teacher_detections = teacher  # leaves that ask for gradients
        losses = term(context)
        sum(losses.values()).backward()
        for tensor in (*student.values(), s_mem):
            self.assertGreater(tensor.grad.abs().sum().item(), 0)
        for tensor in (teacher["pred_logits"], teacher["pred_boxes"], t_mem):
            self.assertIsNone(tensor.grad)
        self.assertTrue(all(p.grad is not None for p in term.parameters()))

    def test_float32_under_autocast(self):
        student, teacher, s_mem, t_mem, padding, targets = make_inputs(3, 3)
        term = bound_term(False)
        context = query_context(student, teacher, targets, s_mem, t_mem, padding)
        plain = term(context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = term(context)
        for key, value in plain.items():
            self.assertEqual(mixed[key].dtype, torch.float32, key)
            self.assertAlmostEqual(mixed[key].item(), value.item(), delta=1e-6 * abs(value.item()),
                                   msg=key)  # fmt: skip

    def test_state_dict_round_trip(self):
        student, teacher, s_mem, t_mem, padding, targets = make_inputs(2, 4)
        first, second = bound_term(True), bound_term(True)
        second.load_state_dict(first.state_dict())
        context = query_context(student, teacher, targets, s_mem, t_mem, padding)
        a, b = first(context), second(context)
        for key in a:
            self.assertEqual(a[key].item(), b[key].item(), key)


class TestQSKDStartUp(unittest.TestCase):
    def test_not_a_detr(self):
        with self.assertRaisesRegex(ValueError, "QSKDLoss.*teacher \\(NotADETR\\) lacks"):
            QSKDLoss().bind(StandInDETR(), NotADETR())

    def test_classifier_types_must_agree(self):
        with self.assertRaisesRegex(ValueError, "QSKDLoss.*same classifier type"):
            QSKDLoss().bind(StandInDETR(use_focal=False), StandInDETR(use_focal=True))

    def test_config_defaults(self):
        term = QSKDLoss(tiny_cfg())
        self.assertEqual(term.weights, (1.0, 5.0, 2.0))
        self.assertEqual((term.agfd_weight, term.giou_threshold, term.softmax), (100.0, 0.0, False))
        no_agfd = QSKDLoss(tiny_cfg("MODEL.KD.QSKD.AGFD_WEIGHT", "0.0"))
        self.assertEqual(no_agfd.inputs, {"detections", "targets"})


class TestQSKDInTraining(unittest.TestCase):
    def test_kd_step_on_demo_pair(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = demo_pair_trainer(tmp, "MODEL.KD.LOSSES", "['KDDETRLoss', 'QSKDLoss']")
            self.assertEqual(trainer._trainer.kd_inputs,
                             {"points", "detections", "targets", "encoder_memory"})  # fmt: skip
            trainer.resume_or_load(resume=False)
            trainer.train()
            losses = logged_losses(trainer)
            for part in ("cls", "l1", "giou", "agfd"):
                for suffix in ("", "_0"):
                    value = losses[f"loss_kd_qskd_{part}{suffix}"]
                    self.assertTrue(math.isfinite(value) and value >= 0, part + suffix)
            self.assertIn("loss_kd_cls_general", losses)  # next to KD-DETR's terms
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))

    def test_vanilla_detr_softmax(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = detr_trainer(
                tmp, "MODEL.KD.POINTS", "inconsistent", "MODEL.KD.LOSSES", "['QSKDLoss']"
            )
            self.assertTrue(trainer.kd_losses[0].softmax)
            trainer.resume_or_load(resume=False)
            trainer.train()
            losses = logged_losses(trainer)
            for part in ("cls", "l1", "giou", "agfd"):
                value = losses[f"loss_kd_qskd_{part}"]
                self.assertTrue(math.isfinite(value) and value >= 0, part)

    def test_adapter_optimised_checkpointed_and_resumed_exactly(self):
        check_adapter_resume(self, "MODEL.KD.LOSSES", "['QSKDLoss']")


if __name__ == "__main__":
    unittest.main()
