# Copyright (c) kd_detr contributors.
"""DistributionKDLoss (D-FINE's decoupled distillation focal loss from a teacher's box
distributions) against an independent float64 computation on hand-made distributions, with and
without a change of frame / bins; gradients reach the student only; the distributions at the
points are D-FINE's own; start-up errors; one KD step D-FINE -> D-FINE on the demo data."""
import os
import tempfile
import unittest

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from kd_detr.data import register_from_config
from kd_detr.distill import (
    ConsistentPairing,
    DistillationPointSampler,
    DistributionKDLoss,
    InconsistentPairing,
    KDContext,
    Teacher,
    align_edge_distributions,
    build_kd_losses,
    kd_inputs,
)
from kd_detr.engine import KDTrainer
from kd_detr.modeling.meta_arch.dfine_losses import ddf_loss
from kd_detr.modeling.transformer.dfine_decoder import distance2bbox, weighting_function

from .common import REPO_ROOT
from .kd_helpers import tiny_cfg
from .model_helpers import config_from, perturb_box_heads, single_thread_module
from .test_dfine_parity import CONFIG as DFINE_TINY
from .test_rt_detr_parity import images

setUpModule, tearDownModule = single_thread_module()

DEMO_RECIPE = os.path.join(
    REPO_ROOT, "configs", "kd_zoo", "ddf_dfine_efflite0_from_efflite2_demo.yaml"
)
DEMO_TEACHER = os.path.join(REPO_ROOT, "configs", "demo", "dfine_efflite2_demo.yaml")


# ---------------------------------------------------------------- float64 reference
def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def edge_position(box, edge, value):
    """Absolute coordinate of edge ``edge`` (0 left, 1 top, 2 right, 3 bottom) of a cxcywh box
    whose centre-to-edge distance is ``value`` box sizes."""
    cx, cy, w, h = box
    return {0: cx - value * w, 1: cy - value * h, 2: cx + value * w, 3: cy + value * h}[edge]


def edge_value(box, edge, position):
    """Inverse of :func:`edge_position`."""
    cx, cy, w, h = box
    return {0: (cx - position) / w, 1: (cy - position) / h,
            2: (position - cx) / w, 3: (position - cy) / h}[edge]  # fmt: skip


def reference_align(p, src_box, src_bins, dst_box, dst_bins, edge):
    """Move each source bin's probability to the destination bins around its edge position."""
    q = np.zeros(len(dst_bins))
    for n, mass in enumerate(p):
        u = edge_value(dst_box, edge, edge_position(src_box, edge, src_bins[n]))
        if u <= dst_bins[0]:
            q[0] += mass
        elif u >= dst_bins[-1]:
            q[-1] += mass
        else:
            k = max(j for j in range(len(dst_bins)) if dst_bins[j] <= u)
            frac = (u - dst_bins[k]) / (dst_bins[k + 1] - dst_bins[k])
            q[k] += mass * (1 - frac)
            q[k + 1] += mass * frac
    return q


def np_iou(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def reference_ddf(student, teacher, conf, layer, T):
    """D-FINE's DDF of one student layer, float64, point by point (see the module doc)."""
    s = student["pred_corners"][layer].detach().double().numpy()
    t = teacher["pred_corners"].detach().double().numpy()
    s_bins = student["corner_offsets"].double().numpy()
    t_bins = teacher["corner_offsets"].double().numpy()
    bsz, num = t.shape[:2]
    pos, neg = [], []
    for b in range(bsz):
        for i in range(num):
            if teacher["matched"][b, i]:
                w = np_iou(student["pred_boxes"][layer, b, i].double().numpy(),
                           teacher["matched_boxes"][b, i].double().numpy())  # fmt: skip
            else:
                w = float(conf[b, i])
            for e in range(4):
                pt = np_softmax(t[b, i, e * len(t_bins) : (e + 1) * len(t_bins)] / T)
                q = reference_align(
                    pt, teacher["initial_boxes"][b, i].double().numpy(), t_bins,
                    student["initial_boxes"][b, i].double().numpy(), s_bins, e,
                )  # fmt: skip
                ps = np_softmax(s[b, i, e * len(s_bins) : (e + 1) * len(s_bins)] / T)
                kl = sum(qn * np.log(qn / psn) for qn, psn in zip(q, ps) if qn > 0) * T * T
                (pos if teacher["matched"][b, i] else neg).append(w * kl)
    n_pos, n_neg = np.sqrt(len(pos) / bsz), np.sqrt(len(neg) / bsz)
    mean_pos = np.mean(pos) if pos else 0.0
    mean_neg = np.mean(neg) if neg else 0.0
    return (mean_pos * n_pos + mean_neg * n_neg) / (n_pos + n_neg)


def bins(num_bins, reg_scale=4.0, up=0.5):
    """D-FINE's corner offsets 0.5 + W(n) / reg_scale, float64."""
    up, reg_scale = torch.tensor([up]).double(), torch.tensor([reg_scale]).double()
    return 0.5 + weighting_function(num_bins, up, reg_scale) / reg_scale


def hand_pair(t_bins, s_bins, same_frames, seed=0, layers=2, bsz=2, num=3, classes=3):
    gen = torch.Generator().manual_seed(seed)

    def boxes():
        centres = torch.rand(bsz, num, 2, generator=gen) * 0.4 + 0.3
        sizes = torch.rand(bsz, num, 2, generator=gen) * 0.3 + 0.1
        return torch.cat([centres, sizes], -1).double()

    t_init = boxes()
    s_init = t_init.clone() if same_frames else boxes()
    student = {
        "pred_corners": (torch.randn(layers, bsz, num, 4 * len(s_bins), generator=gen).double()
                         * 2).requires_grad_(True),  # fmt: skip
        "pred_boxes": torch.stack([boxes() for _ in range(layers)]),
        "initial_boxes": s_init,
        "corner_offsets": s_bins,
    }
    teacher = {
        "pred_corners": (torch.randn(bsz, num, 4 * len(t_bins), generator=gen).double() * 3)
        .requires_grad_(True),
        "pred_logits": torch.randn(bsz, num, classes, generator=gen).double(),
        "pred_boxes": boxes(),
        "initial_boxes": t_init,
        "corner_offsets": t_bins,
        "matched": torch.tensor([[True, False, False], [False, False, True]]),
        "matched_boxes": boxes(),
    }
    return student, teacher


class TestDistributionKDFormula(unittest.TestCase):
    T = 5.0

    def check(self, t_bins, s_bins, same_frames, weights=None):
        student, teacher = hand_pair(t_bins, s_bins, same_frames)
        term = DistributionKDLoss(weight=1.5, temperature=self.T)
        out = term.pair_losses(student, teacher, weights, "g")
        self.assertEqual(set(out), {"loss_kd_ddf_g", "loss_kd_ddf_g_0"})
        if weights is None:
            conf = teacher["pred_logits"].sigmoid().amax(-1).numpy()
        else:
            conf = weights.double().numpy()
        for layer, key in ((0, "loss_kd_ddf_g_0"), (1, "loss_kd_ddf_g")):
            expected = 1.5 * reference_ddf(student, teacher, conf, layer, self.T)
            self.assertAlmostEqual(out[key].item(), expected, places=5, msg=key)
        return student, teacher, out

    def test_same_frames_and_bins(self):
        self.check(bins(8), bins(8), same_frames=True)

    def test_other_frames_and_bins(self):
        self.check(bins(8, reg_scale=4.0), bins(6, reg_scale=2.0), same_frames=False)

    def test_point_weights_replace_the_confidence(self):
        weights = torch.tensor([[0.2, 0.9, 0.4], [0.7, 0.1, 0.3]])
        self.check(bins(8), bins(8), same_frames=False, weights=weights)

    def test_equals_go_lsd_ddf_when_frames_agree(self):
        """With the same initial boxes and bins, the term is D-FINE's GO-LSD loss_ddf (the
        model's own implementation) with the teacher in the role of the final layer."""
        student, teacher = hand_pair(bins(8), bins(8), same_frames=True)
        term = DistributionKDLoss(weight=1.0, temperature=self.T)
        out = term.pair_losses(student, teacher, None, "g")
        matched = teacher["matched"]
        iou = torch.tensor([
            np_iou(student["pred_boxes"][0, b, i].numpy(), teacher["matched_boxes"][b, i].numpy())
            for b, i in matched.nonzero().tolist()
        ])  # fmt: skip
        go_lsd = ddf_loss(
            student["pred_corners"][0], teacher["pred_corners"], teacher["pred_logits"],
            matched, iou, num_bins=8, T=self.T,
        )  # fmt: skip
        self.assertAlmostEqual(out["loss_kd_ddf_g_0"].item(), go_lsd.item(), places=5)

    def test_gradients_reach_the_student_only(self):
        student, teacher = hand_pair(bins(8), bins(6), same_frames=False)
        term = DistributionKDLoss()
        sum(term.pair_losses(student, teacher, None, "g").values()).backward()
        self.assertIsNone(teacher["pred_corners"].grad)
        grad = student["pred_corners"].grad
        self.assertTrue(torch.isfinite(grad).all())
        self.assertGreater(grad[0].abs().sum().item(), 0)  # both layers are distilled
        self.assertGreater(grad[1].abs().sum().item(), 0)

    def test_alignment_keeps_the_expected_edge(self):
        gen = torch.Generator().manual_seed(3)
        src, dst = bins(10), bins(16, reg_scale=3.0, up=1.0)
        prob = torch.rand(5, 4, len(src), generator=gen).double().softmax(-1)
        src_box = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).double().expand(5, 4)
        dst_box = torch.tensor([[0.52, 0.47, 0.25, 0.28]]).double().expand(5, 4)
        out = align_edge_distributions(prob, src_box, src, dst_box, dst)
        torch.testing.assert_close(out.sum(-1), prob.sum(-1))
        for e in range(4):
            positions = [edge_position(src_box[0].tolist(), e, v) for v in src.tolist()]
            values = torch.tensor([edge_value(dst_box[0].tolist(), e, x) for x in positions])
            inside = (values > dst[0]) & (values < dst[-1])
            self.assertTrue(inside.all())  # so the mean is kept exactly
            expected = (prob[:, e] * values).sum(-1)
            torch.testing.assert_close((out[:, e] * dst).sum(-1), expected)

    def test_no_points(self):
        student, teacher = hand_pair(bins(8), bins(8), same_frames=True, num=0)
        teacher["matched"] = torch.zeros(2, 0, dtype=torch.bool)
        out = DistributionKDLoss().pair_losses(student, teacher, None, "g")
        self.assertEqual(out["loss_kd_ddf_g"].item(), 0.0)

    def test_missing_distributions_are_named(self):
        student, teacher = hand_pair(bins(8), bins(8), same_frames=True)
        del teacher["pred_corners"]
        with self.assertRaisesRegex(ValueError, r"teacher's pair has no \['pred_corners'\]"):
            DistributionKDLoss().pair_losses(student, teacher, None, "g")

    def test_bad_settings(self):
        with self.assertRaisesRegex(ValueError, "MODEL.KD.DDF.MATCHING"):
            DistributionKDLoss(matching="student")
        with self.assertRaisesRegex(ValueError, "MODEL.KD.DDF.TEMPERATURE"):
            DistributionKDLoss(temperature=0.0)


def tiny_dfine(*opts, seed=0):
    torch.manual_seed(seed)
    model = build_model(config_from(DFINE_TINY, *opts)).eval()
    perturb_box_heads(list(model.bbox_embed) + [model.enc_bbox_head])
    return model


class TestDFINEDistributionsAtPoints(unittest.TestCase):
    def test_group_distributions_equal_the_detection_queries(self):
        """The model's own detection queries decoded as a point group give the distributions
        (and initial boxes) D-FINE computes for them by its own path; the teacher's targets are
        the final layer's, detached, with the model's bins."""
        model = tiny_dfine()
        x, mask = images()
        with torch.no_grad():
            plain = model.forward_raw((x, mask))
            layers = plain["layers"]
            group = {"boxes": layers["reference_boxes"][0], "content": layers["query_content"]}
            grouped = model.forward_raw((x, mask), [group])["groups"][0]
        num_bins = model.num_bins
        self.assertEqual(tuple(grouped["pred_corners"].shape), (2, 2, 10, 4 * (num_bins + 1)))
        torch.testing.assert_close(grouped["pred_corners"], layers["pred_corners"])
        torch.testing.assert_close(grouped["initial_boxes"], layers["initial_boxes"])
        teacher = Teacher(model, None)
        targets, _ = teacher.targets(grouped, distributions=True)
        torch.testing.assert_close(targets["pred_corners"], layers["pred_corners"][-1])
        expected_keys = {"pred_logits", "pred_boxes", "hidden_states", "pred_corners",
                         "initial_boxes", "corner_offsets"}  # fmt: skip
        self.assertEqual(set(targets), expected_keys)
        plain_targets, _ = teacher.targets(grouped)
        self.assertNotIn("pred_corners", plain_targets)
        # corner_offsets: the edge of bin n is centre +- offset x size (distance2bbox)
        offsets = model.corner_offsets()
        corners = layers["pred_corners"][-1]
        one_hot = torch.full_like(corners, -1e4)
        one_hot[..., 5] = 1e4  # every left edge on bin 5 (the other edges: uniform)
        dec = model.transformer
        boxes = distance2bbox(layers["initial_boxes"], dec.integral(one_hot), dec.reg_scale)
        left = boxes[..., 0] - boxes[..., 2] / 2
        init = layers["initial_boxes"]
        torch.testing.assert_close(left, init[..., 0] - offsets[5] * init[..., 2])

    def test_pairing_carries_distributions_and_gradients_reach_the_student_only(self):
        """Through the consistent pairing of two different D-FINE models: the pairs carry the
        distributions only when asked, and the term's gradient reaches the student's
        distribution heads, never the teacher."""
        student = tiny_dfine().train()
        teacher = Teacher(tiny_dfine(seed=1), None)
        sampler = DistillationPointSampler(num_points=4)
        pairing = ConsistentPairing(student=student, teacher=teacher, sampler=sampler)
        x, mask = images()
        t_groups = pairing.teacher_groups(0)
        with torch.no_grad():
            t_out = teacher.model.forward_raw((x, mask), t_groups)
        s_out = student.forward_raw((x, mask), pairing.student_groups(t_out, t_groups, 2))
        boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]])
        targets = [{"labels": torch.tensor([1, 2]), "boxes": boxes}] * 2
        term = DistributionKDLoss()
        term.bind(student, teacher.model)
        context = KDContext(0, [], [], s_out, t_out, False, targets=targets)
        self.assertNotIn("pred_corners", pairing.pairs(context)[0].teacher)
        context.inputs = term.inputs
        context.pairs = pairing.pairs(context)
        self.assertEqual([p.name for p in context.pairs], ["specific", "general"])
        for pair in context.pairs:
            num_points = pair.teacher["pred_corners"].shape[1]
            self.assertEqual(tuple(pair.student["pred_corners"].shape[:3]), (2, 2, num_points))
        losses = term(context)
        self.assertEqual(len(losses), 4)  # 2 groups x 2 layers
        sum(losses.values()).backward()
        head = student.bbox_embed[0].layers[-1].weight
        self.assertGreater(head.grad.abs().sum().item(), 0)
        self.assertTrue(all(p.grad is None for p in teacher.parameters()))


class TestStartUpErrors(unittest.TestCase):
    def test_teacher_without_distributions(self):
        student = tiny_dfine()
        torch.manual_seed(0)
        dab = build_model(tiny_cfg())
        with self.assertRaises(ValueError) as ctx:
            DistributionKDLoss().bind(student, dab)
        message = str(ctx.exception)
        for word in ("DistributionKDLoss", "DABDETR", "DFINE", '"pred_corners"', "teacher"):
            self.assertIn(word, message)
        self.assertNotIn("the student (DFINE) predicts none", message)
        DistributionKDLoss().bind(student, student)  # two D-FINE models: fine

    def test_pairing_without_distributions(self):
        cfg = config_from(DFINE_TINY, "MODEL.KD.LOSSES", "['KDDETRLoss', 'DistributionKDLoss']")
        terms = build_kd_losses(cfg)
        # kd_inputs reads the pairing's class attributes (inputs, provides, name)
        needed = kd_inputs(terms, ConsistentPairing)
        self.assertEqual(needed, frozenset({"points", "distributions", "targets"}))
        with self.assertRaisesRegex(
            ValueError, "DistributionKDLoss .* MODEL.KD.POINTS 'inconsistent' does not pair"
        ):
            kd_inputs(terms, InconsistentPairing)


class TestKDStepOnDemoData(unittest.TestCase):
    def test_dfine_lite2_teacher_into_dfine_lite0_student(self):
        with tempfile.TemporaryDirectory() as tmp:
            tiny = [
                "DATASETS.KD_DEMO.ROOT", os.path.join(tmp, "data"),
                "DATASETS.KD_DEMO.NUM_TRAIN", "4", "DATASETS.KD_DEMO.NUM_VAL", "2",
                "DATASETS.KD_DEMO.IMAGE_SIZE", "64",
                "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
                "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
                "MODEL.DETR.NUM_QUERIES", "8", "MODEL.DETR.DN.NUM_QUERIES", "8",
                "DATASETS.TEST", "()",
            ]  # fmt: skip
            torch.manual_seed(1)
            teacher = build_model(config_from(DEMO_TEACHER, *tiny))
            perturb_box_heads(list(teacher.bbox_embed))  # non-uniform distributions
            DetectionCheckpointer(teacher, save_dir=tmp).save("teacher")
            cfg = config_from(
                DEMO_RECIPE, *tiny,
                "OUTPUT_DIR", os.path.join(tmp, "kd"),
                "MODEL.KD.TEACHER.WEIGHTS", os.path.join(tmp, "teacher.pth"),
                "MODEL.KD.GENERAL.NUM_POINTS", "6",
                "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "0",
                "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0",
            )  # fmt: skip
            cfg.MODEL.KD.TEACHER.OPTS = list(cfg.MODEL.KD.TEACHER.OPTS) + tiny
            cfg.freeze()
            register_from_config(cfg)
            trainer = KDTrainer(cfg)
            trainer.resume_or_load(resume=False)
            self.assertEqual(trainer._trainer.kd_inputs,
                             frozenset({"points", "distributions", "targets"}))  # fmt: skip
            trainer.train()
            losses = {
                k: v for k, (v, _) in trainer.storage.latest().items() if k.startswith("loss_")
            }
        for group in ("specific", "general"):
            for suffix in ("", "_0", "_1"):
                self.assertGreater(losses[f"loss_kd_ddf_{group}{suffix}"], 0, (group, suffix))
            self.assertGreater(losses[f"loss_kd_bbox_{group}"], 0)
        self.assertIn("loss_ddf_0", losses)  # the student's own GO-LSD stays on
        self.assertTrue(all(np.isfinite(v) for v in losses.values()), losses)


if __name__ == "__main__":
    unittest.main()
