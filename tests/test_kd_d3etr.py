# Copyright (c) kd_detr contributors.
"""D3ETR: the MixMatcher's adaptive matching (Hungarian pairs between the two models' detection
queries of every layer) and fixed matching (the student's outputs on the teacher's queries,
paired by index) against independent float64 computations (numpy, scipy's
linear_sum_assignment) for sigmoid and softmax models, more and fewer student than teacher
queries; gradients to the student only; start-up errors naming the method, the model and what
is missing; KD steps on the demo pair (next to KD-DETR's terms), on DINO and on vanilla
(softmax) DETR."""
import math
import os
import tempfile
import unittest

import numpy as np
import torch

from kd_detr.distill import D3ETRLoss, PointPair, fixed_pairs

from .common import REPO_ROOT
from .kd_feature_helpers import demo_pair_trainer, logged_losses
from .kd_helpers import kd_student_cfg, run_kd_step, save_teacher, tiny_cfg
from .kd_query_helpers import (
    NotADETR,
    StandInDETR,
    detr_trainer,
    make_query_kd_inputs,
    np_,
    np_pair_sums,
    np_soft_match,
    query_context,
    random_boxes,
)
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

B, LS, LT, N, K, D, S = 2, 2, 3, 3, 3, 4, 5
WEIGHTS = (1.0, 5.0, 2.0)


def make_inputs(seed, num_student_queries, num_logits=K):
    """Student detection layers (L_s = 2, Q queries), teacher detections (L_t = 3, N = 3) and
    the student's "specific" group (its L_s layers on the teacher's N queries)."""
    student, teacher, *_ = make_query_kd_inputs(
        seed, shapes=(B, LS, LT, num_student_queries, N, D, D, S), num_logits=num_logits,
        padded_from=S, target_counts=(1, 0), num_classes=2,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 100)
    group = {"pred_logits": (2 * torch.randn(LS, B, N, num_logits, generator=gen)).requires_grad_(),
             "pred_boxes": random_boxes(gen, LS, B, N).requires_grad_()}  # fmt: skip
    return student, teacher, group


def context_of(student, teacher, group):
    return query_context(student, teacher, [], pairs=[PointPair("specific", group, {}, None)])


def reference(student, teacher, group, softmax, adaptive=True, fixed=True):
    """Every loss of D3ETRLoss, in float64: scipy's Hungarian matching for the adaptive pairs,
    index pairs for the fixed ones; student layer l against teacher layer l + L_t - L_s."""
    t_logits, t_boxes = np_(teacher["pred_logits"]), np_(teacher["pred_boxes"])
    out = {}
    for kind, source, on in (("adaptive", student, adaptive), ("fixed", group, fixed)):
        if not on:
            continue
        s_logits, s_boxes = np_(source["pred_logits"]), np_(source["pred_boxes"])
        for layer in range(LS):
            t = layer + LT - LS
            sums = np.zeros(4)
            for b in range(B):
                if kind == "adaptive":
                    rows, cols = np_soft_match(s_logits[layer, b], s_boxes[layer, b],
                                               t_logits[t, b], t_boxes[t, b], softmax)  # fmt: skip
                    pairs = list(zip(rows, cols))
                else:
                    pairs = [(i, i) for i in range(N)]
                sums += np_pair_sums(s_logits[layer, b], s_boxes[layer, b], t_logits[t, b],
                                     t_boxes[t, b], pairs, softmax)  # fmt: skip
            suffix = "" if layer == LS - 1 else f"_{layer}"
            for name, weight, value in zip(("cls", "l1", "giou"), WEIGHTS, sums[:3]):
                out[f"loss_kd_d3etr_{kind}_{name}{suffix}"] = weight * value / max(sums[3], 1.0)
    return out


def bound_term(softmax, **kwargs):
    term = D3ETRLoss(softmax=softmax, **kwargs)
    classes = K - int(softmax)
    term.bind(StandInDETR(D, not softmax, num_classes=classes),
              StandInDETR(D, not softmax, num_classes=classes))  # fmt: skip
    return term


class TestD3ETRFormulas(unittest.TestCase):
    def check(self, got, expected):
        self.assertEqual(set(got), set(expected))
        for key, value in expected.items():
            self.assertAlmostEqual(got[key].item(), value, delta=2e-6 * max(1.0, value), msg=key)

    def test_adaptive_and_fixed_matching(self):
        for softmax in (False, True):
            for num_queries in (4, 2):  # more, then fewer student queries than the teacher's
                student, teacher, group = make_inputs(num_queries, num_queries)
                term = bound_term(softmax)
                self.assertEqual(term.inputs, {"detections", "points"})
                got = term(context_of(student, teacher, group))
                expected = reference(student, teacher, group, softmax)
                self.assertEqual(len(expected), 12)
                with self.subTest(softmax=softmax, queries=num_queries):
                    self.check(got, expected)

    def test_one_matching_alone(self):
        student, teacher, group = make_inputs(7, 4)
        adaptive = bound_term(True, fixed=False)
        self.assertEqual(adaptive.inputs, {"detections"})
        got = adaptive(query_context(student, teacher, []))  # reads no point group
        self.check(got, reference(student, teacher, group, True, fixed=False))
        fixed = bound_term(True, adaptive=False)
        got = fixed(context_of(student, teacher, group))
        self.check(got, reference(student, teacher, group, True, adaptive=False))

    def test_adaptive_pairs_are_the_hungarian_optimum(self):
        # teacher query j predicts what student query perm[j] predicts: every pair's class cost
        # is at its minimum (the teacher's entropy) and its box costs are zero only there, so
        # the matching recovers perm and the box losses vanish
        student, teacher, _ = make_inputs(3, N)
        perm = [2, 0, 1]
        teacher = {k: v.detach().clone() for k, v in teacher.items()}
        for key in ("pred_logits", "pred_boxes"):
            teacher[key][LT - LS :] = student[key].detach()[:, :, perm]
        for softmax in (False, True):
            term = bound_term(softmax, fixed=False)
            context = query_context(student, teacher, [])
            s_out = {k: v[LS - 1].detach() for k, v in student.items()}
            targets = [{"labels": teacher["pred_logits"][LT - 1, b],
                        "boxes": teacher["pred_boxes"][LT - 1, b]} for b in range(B)]  # fmt: skip
            for rows, cols in term.matcher(s_out, targets):
                self.assertEqual(dict(zip(cols.tolist(), rows.tolist())), dict(enumerate(perm)))
            losses = term(context)
            for suffix in ("_0", ""):
                for part in ("l1", "giou"):
                    value = losses[f"loss_kd_d3etr_adaptive_{part}{suffix}"].item()
                    self.assertAlmostEqual(value, 0.0, places=5)

    def test_fixed_pairs(self):
        pairs = fixed_pairs(2, 3)
        self.assertEqual(len(pairs), 2)
        for rows, cols in pairs:
            self.assertEqual((rows.tolist(), cols.tolist()), ([0, 1, 2], [0, 1, 2]))
            self.assertEqual(rows.dtype, torch.int64)

    def test_missing_or_wrong_specific_group(self):
        student, teacher, group = make_inputs(0, 4)
        term = bound_term(False)
        with self.assertRaisesRegex(RuntimeError, "D3ETRLoss.*FIXED_MATCHING.*'specific'"):
            term(query_context(student, teacher, []))
        wrong = {k: v[:, :, :2] for k, v in group.items()}
        with self.assertRaisesRegex(RuntimeError, "D3ETRLoss.*must be the teacher's queries"):
            term(context_of(student, teacher, wrong))


class TestD3ETRGradients(unittest.TestCase):
    def test_student_only(self):
        student, teacher, group = make_inputs(5, 4)
        context = context_of(student, teacher, group)
        # build_kd_context detaches; here the teacher tensors are leaves that ask for gradients
        context.teacher_detections = teacher
        losses = bound_term(False)(context)
        self.assertTrue(all(math.isfinite(v.item()) for v in losses.values()))
        sum(losses.values()).backward()
        for tensor in (*student.values(), *group.values()):
            self.assertGreater(tensor.grad.abs().sum().item(), 0)
        for tensor in (teacher["pred_logits"], teacher["pred_boxes"]):
            self.assertIsNone(tensor.grad)
        self.assertEqual(len(list(bound_term(False).parameters())), 0)

    def test_float32_under_autocast(self):
        student, teacher, group = make_inputs(6, 4)
        term = bound_term(False)
        context = context_of(student, teacher, group)
        plain = term(context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = term(context)
        for key, value in plain.items():
            self.assertEqual(mixed[key].dtype, torch.float32, key)
            self.assertAlmostEqual(mixed[key].item(), value.item(), delta=1e-6 * abs(value.item()),
                                   msg=key)  # fmt: skip


class TestD3ETRStartUp(unittest.TestCase):
    def test_not_a_detr(self):
        with self.assertRaisesRegex(ValueError, "D3ETRLoss.*student \\(NotADETR\\) lacks"):
            D3ETRLoss().bind(NotADETR(), StandInDETR())

    def test_fixed_matching_needs_box_queries(self):
        regex = "D3ETRLoss.*FIXED_MATCHING.*teacher \\(StandInDETR\\) has no box queries"
        with self.assertRaisesRegex(ValueError, regex):
            D3ETRLoss().bind(StandInDETR(), StandInDETR(box_query_groups=False))
        D3ETRLoss(fixed=False).bind(StandInDETR(), StandInDETR(box_query_groups=False))

    def test_classifier_types_must_agree(self):
        with self.assertRaisesRegex(ValueError, "D3ETRLoss.*same classifier type"):
            D3ETRLoss().bind(StandInDETR(use_focal=True), StandInDETR(use_focal=False))

    def test_one_matching_at_least(self):
        with self.assertRaisesRegex(ValueError, "D3ETRLoss.*ADAPTIVE_MATCHING.*FIXED_MATCHING"):
            D3ETRLoss(adaptive=False, fixed=False)

    def test_config(self):
        term = D3ETRLoss(tiny_cfg())
        self.assertEqual(term.weights, WEIGHTS)
        self.assertEqual((term.adaptive, term.fixed, term.softmax), (True, True, False))
        self.assertEqual(
            (term.matcher.cost_class, term.matcher.cost_bbox, term.matcher.cost_giou), WEIGHTS
        )
        for opts in (("MODEL.KD.POINTS", "inconsistent"), ("MODEL.KD.SPECIFIC.ENABLED", "False")):
            with self.assertRaisesRegex(ValueError, "D3ETRLoss.*FIXED_MATCHING.*consistent"):
                D3ETRLoss(tiny_cfg(*opts))
        self.assertEqual(term.attn_weights, (1e4, 1e3))  # TPRD's weight_dict
        self.assertEqual(term.inputs, {"detections", "points", "attention"})
        alone = D3ETRLoss(tiny_cfg("MODEL.KD.POINTS", "inconsistent",
                                   "MODEL.KD.D3ETR.FIXED_MATCHING", "False"))  # fmt: skip
        self.assertEqual(alone.inputs, {"detections", "attention"})
        predictions = D3ETRLoss(tiny_cfg("MODEL.KD.D3ETR.SELF_ATTN_WEIGHT", "0.0",
                                         "MODEL.KD.D3ETR.CROSS_ATTN_WEIGHT", "0.0"))  # fmt: skip
        self.assertEqual(predictions.inputs, {"detections", "points"})


class TestD3ETRInTraining(unittest.TestCase):
    def check_losses(self, losses, kinds=("adaptive", "fixed"), suffixes=("", "_0")):
        for kind in kinds:
            for part in ("cls", "l1", "giou"):
                for suffix in suffixes:
                    value = losses[f"loss_kd_d3etr_{kind}_{part}{suffix}"]
                    self.assertTrue(math.isfinite(value) and value > 0, kind + part + suffix)

    def test_kd_step_on_demo_pair_next_to_kd_detr(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = demo_pair_trainer(tmp, "MODEL.KD.LOSSES", "['KDDETRLoss', 'D3ETRLoss']")
            # attention terms on by default (TPRD's weights; tests/test_kd_d3etr_attention.py)
            self.assertEqual(trainer._trainer.kd_inputs, {"points", "detections", "attention"})
            trainer.resume_or_load(resume=False)
            trainer.train()
            losses = logged_losses(trainer)
            self.check_losses(losses)
            self.assertIn("loss_kd_cls_general", losses)  # KD-DETR's terms alongside
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))

    def test_dino(self):
        config_file = os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml")
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp, config_file=config_file)
            cfg = kd_student_cfg(config_file, tmp, weights)
            cfg.merge_from_list(
                ["MODEL.KD.LOSSES", "['D3ETRLoss']", "MODEL.KD.GENERAL.ENABLED", "False",
                 "MODEL.KD.D3ETR.SELF_ATTN_WEIGHT", "0.0",  # no attention maps in DINO
                 "MODEL.KD.D3ETR.CROSS_ATTN_WEIGHT", "0.0"]
            )  # fmt: skip
            trainer, losses, t_calls, s_calls = run_kd_step(cfg, config_file, [])
        # fixed matching: the student decodes exactly the teacher's queries (one extra group)
        groups = s_calls[0]["kwargs"]["extra_query_groups"]
        self.assertEqual(len(groups), 1)
        torch.testing.assert_close(groups[0]["boxes"],
                                   t_calls[0]["out"]["layers"]["reference_boxes"][0])  # fmt: skip
        self.check_losses(losses)
        self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))

    def test_vanilla_detr_softmax(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = detr_trainer(tmp, "MODEL.KD.POINTS", "inconsistent", "MODEL.KD.LOSSES",
                                   "['D3ETRLoss']", "MODEL.KD.D3ETR.FIXED_MATCHING", "False")
            self.assertTrue(trainer.kd_losses[0].softmax)
            trainer.resume_or_load(resume=False)
            trainer.train()
            self.check_losses(logged_losses(trainer), kinds=("adaptive",), suffixes=("",))


if __name__ == "__main__":
    unittest.main()
