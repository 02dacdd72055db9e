# Copyright (c) kd_detr contributors.
"""DETRDistill: (a) the Hungarian-matched logit and box KD, (b) the target-aware feature KD and
(c) the query-prior assignment KD against independent float64 computations (numpy, scipy's
linear_sum_assignment) for sigmoid and softmax models; gradients to the student (and the
adapter) only; start-up errors naming the method, the model and what is missing; KD steps on
the demo pair and on vanilla (softmax) DETR; the adapter optimised, checkpointed and resumed
exactly."""
import math
import os
import tempfile
import unittest

import numpy as np
import torch

from kd_detr.distill import DETRDistillLoss, PointPair

from .common import REPO_ROOT
from .kd_feature_helpers import demo_pair_trainer, logged_losses
from .kd_helpers import kd_student_cfg, run_kd_step, save_teacher, tiny_cfg
from .kd_query_helpers import (
    NotADETR,
    StandInDETR,
    check_adapter_resume,
    detr_trainer,
    make_query_kd_inputs,
    make_targets,
    np_,
    np_gt_match,
    np_iou_giou,
    np_log_softmax,
    np_pair_sums,
    np_sigmoid,
    np_soft_match,
    query_context,
    random_boxes,
)
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

B, LS, LT, Q, N, K, DS, DT, S = 2, 2, 3, 4, 3, 3, 3, 4, 5


def make_inputs(seed=0):
    """Student layers (L_s = 2, Q = 4), teacher layers (L_t = 3, N = 3), memories (S = 5) with
    two padding tokens in image 1, and the ground truth (2 objects, then none)."""
    return make_query_kd_inputs(seed, shapes=(B, LS, LT, Q, N, DS, DT, S), num_logits=K,
                                padded_from=3, target_counts=(2, 0), num_classes=K - 1)


def reference_logit_losses(student, teacher, softmax, threshold=0.0, by_layer=True):
    s_logits, s_boxes = np_(student["pred_logits"]), np_(student["pred_boxes"])
    t_logits, t_boxes = np_(teacher["pred_logits"]), np_(teacher["pred_boxes"])
    out = {}
    for layer in range(LS):
        t = layer + LT - LS if by_layer else LT - 1
        sums = np.zeros(4)
        for b in range(B):
            scores = np.exp(np_log_softmax(t_logits[t, b]))[:, :-1] if softmax else np_sigmoid(
                t_logits[t, b])  # fmt: skip
            keep = np.nonzero(scores.max(-1) >= threshold)[0]
            rows, cols = np_soft_match(
                s_logits[layer, b], s_boxes[layer, b], t_logits[t, b, keep], t_boxes[t, b, keep],
                softmax,
            )
            pairs = [(i, keep[j]) for i, j in zip(rows, cols)]
            sums += np_pair_sums(s_logits[layer, b], s_boxes[layer, b], t_logits[t, b],
                                 t_boxes[t, b], pairs, softmax)  # fmt: skip
        suffix = "" if layer == LS - 1 else f"_{layer}"
        n = max(sums[3], 1.0)
        for name, w, v in zip(("cls", "l1", "giou"), (1.0, 5.0, 2.0), sums[:3]):
            out[f"loss_kd_detrdistill_{name}{suffix}"] = w * v / n
    return out


def reference_feature_losses(term, teacher, s_mem, t_mem, padding, targets, softmax, topk):
    w = term.adapter.weight.detach().double().numpy()
    bias = term.adapter.bias.detach().double().numpy()
    adapted = np_(s_mem) @ w.T + bias
    t_feat, valid = np_(t_mem), ~padding.numpy()
    out = {}
    for t in range(LT):
        total = 0.0
        for b in range(B):
            logits = np_(teacher["pred_logits"])[t, b]
            scores = np.exp(np_log_softmax(logits))[:, :-1] if softmax else np_sigmoid(logits)
            flat = np.argsort(-scores.flatten())[:topk]
            weights = scores.flatten()[flat]
            queries = flat // scores.shape[1]
            gt = targets[b]["boxes"].double().numpy()
            boxes = np_(teacher["pred_boxes"])[t, b]
            if len(gt):
                best = [max(np_iou_giou(boxes[q], g)[0] for g in gt) for q in queries]
                weights = weights * np.array(best)
            hidden = np_(teacher["hidden_states"])[t, b]
            mask = np.zeros(S)
            for s in range(S):
                if not valid[b, s]:
                    continue
                f = t_feat[b, s] / np.linalg.norm(t_feat[b, s])
                sims = [f @ hidden[q] / np.linalg.norm(hidden[q]) for q in queries]
                mask[s] = max(float(np.dot(weights, sims)), 0.01)
            mask /= mask.max()
            for s in range(S):
                if valid[b, s]:
                    total += ((mask[s] * (t_feat[b, s] - adapted[b, s])) ** 2).sum()
        suffix = "" if t == LT - 1 else f"_{t}"
        out[f"loss_kd_detrdistill_feature{suffix}"] = 2.0 * total / (valid.sum() * DT)
    return out


def np_detection_losses(logits, boxes, targets, matching, softmax, num_classes):
    """The project's SetCriterion losses of one layer with a given matching (float64)."""
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    cls = l1 = giou = 0.0
    if softmax:
        num = den = 0.0
    for b, (rows, cols) in enumerate(matching):
        labels = targets[b]["labels"].numpy()
        gt = targets[b]["boxes"].double().numpy()
        assigned = {int(r): int(c) for r, c in zip(rows, cols)}
        for i in range(logits.shape[1]):
            if softmax:
                y = labels[assigned[i]] if i in assigned else num_classes
                weight = 0.1 if y == num_classes else 1.0
                num += weight * -np_log_softmax(logits[b, i])[y]
                den += weight
            else:
                onehot = np.zeros(num_classes)
                if i in assigned:
                    onehot[labels[assigned[i]]] = 1.0
                p = np_sigmoid(logits[b, i])
                ce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
                p_t = p * onehot + (1 - p) * (1 - onehot)
                alpha = 0.25 * onehot + 0.75 * (1 - onehot)
                cls += (alpha * ce * (1 - p_t) ** 2).sum() / num_boxes
            if i in assigned:
                l1 += np.abs(boxes[b, i] - gt[assigned[i]]).sum() / num_boxes
                giou += (1 - np_iou_giou(boxes[b, i], gt[assigned[i]])[1]) / num_boxes
    if softmax:
        cls = num / den
    return {"class": 2.0 * cls, "bbox": 5.0 * l1, "giou": 2.0 * giou}


def bound_term(softmax, **kwargs):
    term = DETRDistillLoss(softmax=softmax, **kwargs)
    term.bind(StandInDETR(DS, not softmax, num_classes=K - int(softmax)),
              StandInDETR(DT, not softmax, num_classes=K - int(softmax)))  # fmt: skip
    return term


class TestDETRDistillFormulas(unittest.TestCase):
    def check(self, got, expected, places=5):
        self.assertEqual(set(got), set(expected))
        for key, value in expected.items():
            self.assertAlmostEqual(got[key].item(), value, places=places, msg=key)

    def test_matched_logit_and_box_kd(self):
        for softmax in (False, True):
            for threshold, by_layer in ((0.0, True), (0.4, True), (0.0, False)):
                student, teacher, *_, targets = make_inputs(1)
                term = DETRDistillLoss(
                    softmax=softmax, feature_weight=0.0, query_prior=False,
                    score_threshold=threshold, layer_by_layer=by_layer,
                )  # fmt: skip
                self.assertEqual(term.inputs, {"detections", "targets"})
                got = term(query_context(student, teacher, targets))
                expected = reference_logit_losses(student, teacher, softmax, threshold, by_layer)
                with self.subTest(softmax=softmax, threshold=threshold, by_layer=by_layer):
                    self.check(got, expected)

    def test_target_aware_feature_kd(self):
        for softmax in (False, True):
            student, teacher, s_mem, t_mem, padding, targets = make_inputs(2)
            term = bound_term(softmax, query_prior=False, topk=4)
            self.assertEqual(term.inputs, {"detections", "targets", "encoder_memory"})
            context = query_context(student, teacher, targets, s_mem, t_mem, padding)
            got = term.feature_losses(context)
            expected = reference_feature_losses(
                term, teacher, s_mem, t_mem, padding, targets, softmax, 4
            )
            with self.subTest(softmax=softmax):
                self.check(got, expected)

    def test_query_prior_assignment_kd(self):
        for softmax in (False, True):
            student, teacher, *_, targets = make_inputs(3)
            gen = torch.Generator().manual_seed(4)
            group = {"pred_logits": torch.randn(LS, B, N, K, generator=gen, requires_grad=True),
                     "pred_boxes": random_boxes(gen, LS, B, N).requires_grad_()}  # fmt: skip
            targets = make_targets(gen, (2, 1) if softmax else (2, 0), K - int(softmax))
            term = bound_term(softmax, feature_weight=0.0, assign_weight=0.5)
            self.assertEqual(term.inputs, {"detections", "targets", "points"})
            pair = PointPair("specific", group, {}, None)
            got = term.assignment_losses(query_context(student, teacher, targets, pairs=[pair]))
            expected = {}
            t_logits, t_boxes = np_(teacher["pred_logits"]), np_(teacher["pred_boxes"])
            for layer in range(LS):
                t = layer + LT - LS
                matching = [np_gt_match(t_logits[t, b], t_boxes[t, b], targets[b]["labels"],
                                        targets[b]["boxes"].double().numpy(), softmax)
                            for b in range(B)]  # fmt: skip
                values = np_detection_losses(
                    np_(group["pred_logits"])[layer], np_(group["pred_boxes"])[layer], targets,
                    matching, softmax, K - int(softmax),
                )
                suffix = "" if layer == LS - 1 else f"_{layer}"
                for name, value in values.items():
                    expected[f"loss_kd_detrdistill_assign_{name}{suffix}"] = 0.5 * value
            with self.subTest(softmax=softmax):
                self.check(got, expected)

    def test_missing_specific_group(self):
        student, teacher, *_, targets = make_inputs(0)
        term = bound_term(False, feature_weight=0.0)
        with self.assertRaisesRegex(RuntimeError, "DETRDistillLoss.*'specific'"):
            term(query_context(student, teacher, targets))


class TestDETRDistillGradients(unittest.TestCase):
    def test_student_and_adapter_only(self):
        student, teacher, s_mem, t_mem, padding, targets = make_inputs(5)
        group = {k: v[:, :, :N].detach().clone().requires_grad_() for k, v in student.items()}
        term = bound_term(False)
        context = query_context(student, teacher, targets, s_mem, t_mem, padding,
                                pairs=[PointPair("specific", group, {}, None)])  # fmt: skip
        # build_kd_context detaches; here the teacher tensors are leaves that ask for gradients
        context.teacher_detections = teacher
        losses = term(context)
        self.assertTrue(all(math.isfinite(v.item()) for v in losses.values()))
        sum(losses.values()).backward()
        for tensor in (*student.values(), *group.values(), s_mem):
            self.assertGreater(tensor.grad.abs().sum().item(), 0)
        for tensor in (teacher["pred_logits"], teacher["pred_boxes"], t_mem):
            self.assertIsNone(tensor.grad)
        self.assertTrue(all(p.grad is not None for p in term.parameters()))

    def test_state_dict_round_trip(self):
        student, teacher, s_mem, t_mem, padding, targets = make_inputs(6)
        first, second = bound_term(True, query_prior=False), bound_term(True, query_prior=False)
        second.load_state_dict(first.state_dict())
        context = query_context(student, teacher, targets, s_mem, t_mem, padding)
        a, b = first(context), second(context)
        for key in a:
            self.assertEqual(a[key].item(), b[key].item(), key)

    def test_float32_under_autocast(self):
        student, teacher, s_mem, t_mem, padding, targets = make_inputs(7)
        group = {k: v[:, :, :N] for k, v in student.items()}
        term = bound_term(False)
        context = query_context(student, teacher, targets, s_mem, t_mem, padding,
                                pairs=[PointPair("specific", group, {}, None)])  # fmt: skip
        plain = term(context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = term(context)
        for key, value in plain.items():
            self.assertEqual(mixed[key].dtype, torch.float32, key)
            self.assertAlmostEqual(mixed[key].item(), value.item(), delta=1e-6 * abs(value.item()),
                                   msg=key)  # fmt: skip

    def test_equal_widths_need_no_adapter(self):
        term = DETRDistillLoss()
        term.bind(StandInDETR(4), StandInDETR(4))
        self.assertIsNone(term.adapter)
        self.assertEqual(len(list(term.parameters())), 0)


class TestDETRDistillStartUp(unittest.TestCase):
    def test_not_a_detr(self):
        with self.assertRaisesRegex(ValueError, "DETRDistillLoss.*student \\(NotADETR\\) lacks"):
            DETRDistillLoss().bind(NotADETR(), StandInDETR())

    def test_query_prior_needs_box_queries(self):
        regex = "DETRDistillLoss.*QUERY_PRIOR.*teacher \\(StandInDETR\\) has no box queries"
        with self.assertRaisesRegex(ValueError, regex):
            DETRDistillLoss().bind(StandInDETR(), StandInDETR(box_query_groups=False))
        DETRDistillLoss(query_prior=False).bind(StandInDETR(), StandInDETR(box_query_groups=False))

    def test_classifier_types_must_agree(self):
        with self.assertRaisesRegex(ValueError, "DETRDistillLoss.*same classifier type"):
            DETRDistillLoss().bind(StandInDETR(use_focal=True), StandInDETR(use_focal=False))

    def test_query_prior_needs_the_specific_group(self):
        cfg = tiny_cfg("MODEL.KD.POINTS", "inconsistent")
        with self.assertRaisesRegex(ValueError, "QUERY_PRIOR.*MODEL.KD.POINTS consistent"):
            DETRDistillLoss(cfg)
        cfg = tiny_cfg("MODEL.KD.GENERAL.ENABLED", "False")
        self.assertTrue(DETRDistillLoss(cfg).query_prior)
        self.assertEqual(DETRDistillLoss(cfg).weights, (1.0, 5.0, 2.0))
        self.assertEqual(DETRDistillLoss(cfg).feature_weight, 2.0)


class TestDETRDistillInTraining(unittest.TestCase):
    def test_kd_step_on_demo_pair(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = demo_pair_trainer(
                tmp, "MODEL.KD.LOSSES", "['DETRDistillLoss']", "MODEL.KD.GENERAL.ENABLED", "False"
            )
            self.assertEqual(trainer._trainer.kd_inputs,
                             {"detections", "targets", "encoder_memory", "points"})  # fmt: skip
            trainer.resume_or_load(resume=False)
            trainer.train()
            losses = logged_losses(trainer)
            for part in ("cls", "l1", "giou", "feature", "assign_class", "assign_bbox",
                         "assign_giou"):  # fmt: skip
                for suffix in ("", "_0"):
                    value = losses[f"loss_kd_detrdistill_{part}{suffix}"]
                    self.assertTrue(math.isfinite(value) and value > 0, part + suffix)
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))

    def test_vanilla_detr_softmax(self):
        with tempfile.TemporaryDirectory() as tmp:
            regex = "DETRDistillLoss.*QUERY_PRIOR.*\\(DETR\\) has no box queries"
            with self.assertRaisesRegex(ValueError, regex):
                detr_trainer(tmp, "MODEL.KD.GENERAL.ENABLED", "False")
            trainer = detr_trainer(
                tmp, "MODEL.KD.POINTS", "inconsistent", "MODEL.KD.DETRDISTILL.QUERY_PRIOR", "False"
            )
            self.assertTrue(trainer.kd_losses[0].softmax)
            trainer.resume_or_load(resume=False)
            trainer.train()
            losses = logged_losses(trainer)
            for part in ("cls", "l1", "giou", "feature"):
                value = losses[f"loss_kd_detrdistill_{part}"]
                self.assertTrue(math.isfinite(value) and value > 0, part)

    def test_adapter_optimised_checkpointed_and_resumed_exactly(self):
        check_adapter_resume(self, "MODEL.KD.LOSSES", "['DETRDistillLoss']",
                             "MODEL.KD.GENERAL.ENABLED", "False")  # fmt: skip


class TestDeformableAndDINO(unittest.TestCase):
    """Both DETR-specific terms in one KD step on the multi-scale box-query variants."""

    def run_step(self, config_file, box_heads=None):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp, config_file=config_file, box_heads=box_heads)
            cfg = kd_student_cfg(config_file, tmp, weights)
            cfg.merge_from_list([
                "MODEL.KD.LOSSES", "['DETRDistillLoss', 'QSKDLoss']",
                "MODEL.KD.GENERAL.ENABLED", "False",
            ])  # fmt: skip
            trainer, losses, t_calls, s_calls = run_kd_step(cfg, config_file, [])
        self.assertEqual(trainer._trainer.kd_inputs,
                         {"detections", "targets", "encoder_memory", "points"})  # fmt: skip
        # (c): the student decodes exactly the teacher's queries (one extra group)
        groups = s_calls[0]["kwargs"]["extra_query_groups"]
        self.assertEqual(len(groups), 1)
        torch.testing.assert_close(groups[0]["boxes"],
                                   t_calls[0]["out"]["layers"]["reference_boxes"][0])  # fmt: skip
        keys = [f"loss_kd_detrdistill_{p}" for p in ("cls", "l1", "giou", "feature",
                                                     "assign_class", "assign_bbox")]  # fmt: skip
        keys += [f"loss_kd_qskd_{p}" for p in ("cls", "l1", "giou", "agfd")]
        for key in keys:
            for suffix in ("", "_0"):
                value = losses[key + suffix]
                self.assertTrue(math.isfinite(value) and value >= 0, key + suffix)
        self.assertGreater(losses["loss_kd_detrdistill_cls"], 0)
        self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))

    def test_deformable_detr(self):
        deformable = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")
        self.run_step(deformable, box_heads=lambda m: m._heads()[1])

    def test_dino(self):
        self.run_step(os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml"))


if __name__ == "__main__":
    unittest.main()
