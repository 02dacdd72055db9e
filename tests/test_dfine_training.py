# Copyright (c) kd_detr contributors.
"""D-FINE in training: FDR targets and the FGL / DDF (GO-LSD) losses against float64 hand
computations, extra query groups (detection outputs unchanged), one KD step with a D-FINE
student, and a few optimizer steps on real BCCD images."""
import tempfile
import unittest

import torch
import torch.nn.functional as F

from detectron2.data import DatasetMapper
from detectron2.modeling import build_model

from kd_detr.data import load_voc_instances
from kd_detr.engine.optimizer import build_optimizer
from kd_detr.modeling.meta_arch.dfine_losses import (
    bbox2distance,
    ddf_loss,
    fgl_loss,
    translate_gt,
    union_indices,
)
from kd_detr.modeling.transformer.dfine_decoder import distance2bbox, weighting_function

from .common import shared_data
from .kd_helpers import assert_kd_losses, kd_student_cfg, run_kd_step, save_teacher
from .model_helpers import config_from, perturb_box_heads, single_thread_module
from .test_dfine_parity import CONFIG
from .test_rt_detr_parity import images
from .test_rt_detr_training import BCCD_CLASSES, DINO_TINY

setUpModule, tearDownModule = single_thread_module()

NUM_BINS = 32
UP, REG = torch.tensor([0.5], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)


class TestDistributionTargets(unittest.TestCase):
    def test_weighting_function_shape_and_range(self):
        w = weighting_function(NUM_BINS, UP, REG)
        self.assertEqual(len(w), NUM_BINS + 1)
        self.assertEqual(w[NUM_BINS // 2].item(), 0.0)
        self.assertAlmostEqual(w[0].item(), -4.0)  # -2 x up x reg_scale
        self.assertAlmostEqual(w[-1].item(), 4.0)
        self.assertTrue((w[1:] > w[:-1]).all())

    def test_targets_invert_distance2bbox(self):
        """Boxes decoded from distances give back bins whose interpolation is the distance."""
        gen = torch.Generator().manual_seed(0)
        points = torch.cat([torch.rand(6, 2, generator=gen) * 0.5 + 0.25,
                            torch.rand(6, 2, generator=gen) * 0.3 + 0.1], 1).double()  # fmt: skip
        distance = (torch.rand(6, 4, generator=gen).double() * 6 - 3)  # inside (-4, 4)
        boxes = distance2bbox(points, distance, REG)
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        index, w_right, w_left = bbox2distance(points, xyxy, NUM_BINS, REG, UP)
        w = weighting_function(NUM_BINS, UP, REG)
        n = index.long()
        rebuilt = w[n] * w_left + w[n + 1] * w_right
        torch.testing.assert_close(rebuilt, distance.reshape(-1))

    def test_out_of_range_values(self):
        index, w_right, w_left = translate_gt(
            torch.tensor([-10.0, 10.0], dtype=torch.float64), NUM_BINS, REG, UP
        )
        self.assertEqual(index.tolist(), [0.0, NUM_BINS - 0.1])
        self.assertEqual((w_right.tolist(), w_left.tolist()), ([0.0, 1.0], [1.0, 0.0]))


class TestLossFormulas(unittest.TestCase):
    def test_fgl_hand_formula(self):
        gen = torch.Generator().manual_seed(1)
        corners = torch.randn(2, 4 * (NUM_BINS + 1), generator=gen, dtype=torch.float64)
        initial = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]], dtype=torch.float64)
        target = torch.tensor([[0.41, 0.36, 0.62, 0.63], [0.24, 0.56, 0.37, 0.66]]).double()
        iou = torch.tensor([0.8, 0.5], dtype=torch.float64)
        loss = fgl_loss(corners, initial, target, iou, NUM_BINS, REG, UP, num_boxes=2.0)
        w = weighting_function(NUM_BINS, UP, REG)
        expected = 0.0
        for q in range(2):
            cx, cy, bw, bh = initial[q].tolist()
            unit = [bw / 4, bh / 4, bw / 4, bh / 4]
            edges = [cx - target[q, 0], cy - target[q, 1], target[q, 2] - cx, target[q, 3] - cy]
            for e in range(4):
                d = (edges[e] / unit[e] - 2.0).item()  # distance in bins' units
                n = int((w <= d).sum().item()) - 1
                wr = (d - w[n]) / (w[n + 1] - w[n])
                logp = F.log_softmax(corners[q].reshape(4, -1)[e], 0)
                expected += -(logp[n] * (1 - wr) + logp[n + 1] * wr).item() * iou[q].item()
        self.assertAlmostEqual(loss.item(), expected / 2.0, places=9)

    def test_ddf_hand_formula(self):
        gen = torch.Generator().manual_seed(2)
        bins = 4
        corners = torch.randn(2, 3, 4 * (bins + 1), generator=gen, dtype=torch.float64)
        teacher = torch.randn(2, 3, 4 * (bins + 1), generator=gen, dtype=torch.float64)
        logits = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
        matched = torch.tensor([[True, False, False], [False, True, True]])
        iou = torch.tensor([0.9, 0.4, 0.7], dtype=torch.float64)
        loss = ddf_loss(corners, teacher, logits, matched, iou, bins, T=5.0)
        pos, neg, it = [], [], iter(iou.tolist())
        for b in range(2):
            for q in range(3):
                weight = next(it) if matched[b, q] else logits[b, q].sigmoid().max().item()
                for e in range(4):
                    s = F.log_softmax(corners[b, q].reshape(4, -1)[e] / 5, 0)
                    t = F.softmax(teacher[b, q].reshape(4, -1)[e] / 5, 0)
                    kl = (t * (t.log() - s)).sum().item() * 25 * weight
                    (pos if matched[b, q] else neg).append(kl)
        n_pos, n_neg = (len(pos) / 2) ** 0.5, (len(neg) / 2) ** 0.5
        expected = (sum(pos) / len(pos) * n_pos + sum(neg) / len(neg) * n_neg) / (n_pos + n_neg)
        self.assertAlmostEqual(loss.item(), expected, places=9)


class TestUnionMatching(unittest.TestCase):
    def test_union_keeps_each_querys_most_frequent_target(self):
        t = torch.tensor
        layers = [
            [(t([0, 3]), t([1, 0])), (t([2]), t([0]))],
            [(t([0, 5]), t([1, 0])), (t([2]), t([0]))],
            [(t([0, 3]), t([0, 1])), (t([], dtype=torch.long), t([], dtype=torch.long))],
        ]
        (q0, t0), (q1, t1) = union_indices(layers)
        # image 0: query 0 -> target 1 (twice) over 0 (once); query 3 -> 0 / 1 once each: the
        # smaller pair (3, 0); query 5 -> 0. Image 1: query 2 -> 0.
        self.assertEqual((q0.tolist(), t0.tolist()), ([0, 3, 5], [1, 0, 0]))
        self.assertEqual((q1.tolist(), t1.tolist()), ([2], [0]))

    def test_box_losses_use_the_union(self):
        model = tiny_dfine().train()
        x, _ = images()
        batch = [{"image": img * 255, "instances": inst} for img, inst in zip(x, _instances())]
        calls = []
        original = model.criterion.loss_boxes

        def spy(outputs, targets, indices, num_boxes):
            calls.append(([q.tolist() for q, _ in indices], num_boxes))
            return original(outputs, targets, indices, num_boxes)

        model.criterion.loss_boxes = spy
        torch.manual_seed(0)
        model(batch)
        matched = calls[0][0]
        # every decoder layer, the coarse boxes and the encoder use the same union matching,
        # normalised by its size (the denoising queries keep their fixed matching)
        union_calls = [c for c in calls if c[0] == matched]
        self.assertGreaterEqual(len(union_calls), 4)  # 2 layers + coarse + encoder
        self.assertEqual(union_calls[0][1], float(sum(len(q) for q in matched)))
        self.assertGreaterEqual(sum(len(q) for q in matched), 3)  # at least the 3 objects


def tiny_dfine(*opts):
    torch.manual_seed(0)
    model = build_model(config_from(CONFIG, *opts)).eval()
    perturb_box_heads(list(model.bbox_embed) + [model.enc_bbox_head])
    return model


class TestGroupsAndKD(unittest.TestCase):
    def test_detection_outputs_do_not_depend_on_groups(self):
        x, mask = images()
        groups = [{"boxes": torch.rand(1, 5, 4) * 0.5 + 0.25}]
        for decoding in ("masked", "separate"):
            model = tiny_dfine("MODEL.DETR.GROUP_DECODING", decoding)
            with torch.no_grad():
                plain = model.forward_raw((x, mask))
                grouped = model.forward_raw((x, mask), groups)
            for key in ("pred_logits", "pred_boxes", "pred_corners"):
                torch.testing.assert_close(grouped["layers"][key], plain["layers"][key])
            self.assertEqual(tuple(grouped["groups"][0]["pred_boxes"].shape), (2, 2, 5, 4))

    def test_kd_step_dino_teacher_into_dfine_student(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp, config_file=DINO_TINY)
            cfg = kd_student_cfg(CONFIG, tmp, weights)
            _, losses, t_calls, s_calls = run_kd_step(cfg, DINO_TINY, [])
        assert_kd_losses(self, losses)
        for key in ("loss_fgl", "loss_class_pre", "loss_fgl_dn"):
            self.assertGreater(losses[key], 0, key)
        self.assertIn("loss_ddf_0", losses)  # 0 here: untrained heads give equal distributions
        specific = s_calls[0]["kwargs"]["extra_query_groups"][0]
        teacher_boxes = t_calls[0]["out"]["layers"]["reference_boxes"][0]
        torch.testing.assert_close(specific["boxes"], teacher_boxes)


class TestEfficientNetLiteBackbone(unittest.TestCase):
    def test_dfine_trains_on_efficientnet_lite0(self):
        cfg = config_from(
            CONFIG,
            "MODEL.BACKBONE.NAME", "build_efficientnet_lite_backbone",
            "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
            "MODEL.EFFICIENTNET_LITE.OUT_FEATURES", "['stage3', 'stage4', 'stage5']",
            "MODEL.RTDETR.IN_FEATURES", "['stage3', 'stage4', 'stage5']",
        )  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg).train()
        x, _ = images()
        batch = [{"image": img * 255, "instances": inst} for img, inst in zip(x, _instances())]
        losses = model(batch)
        sum(losses.values()).backward()
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))
        channels = [s.channels for s in model.backbone.output_shape().values()]
        self.assertEqual(channels, [40, 112, 320])  # Lite0 stage3..stage5 into D-FINE
        self.assertIsNotNone(model.input_proj[0][0].weight.grad)


def _instances():
    from detectron2.structures import Boxes, Instances

    out = []
    for i in range(2):
        inst = Instances((96, 128))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 10, 50, 60], [30, 20, 90, 80]])[: i + 1])
        inst.gt_classes = torch.tensor([1, 3])[: i + 1]
        out.append(inst)
    return out


class TestBCCDTraining(unittest.TestCase):
    def test_loss_decreases_on_real_images(self):
        dicts = load_voc_instances(shared_data("bccd"), "train", BCCD_CLASSES)[:2]
        cfg = config_from(
            CONFIG,
            "MODEL.DETR.NUM_CLASSES", "3", "MODEL.DETR.NUM_QUERIES", "40",
            "MODEL.DETR.DN.NUM_QUERIES", "40",
            "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "214",
            "INPUT.RANDOM_FLIP", "none", "SOLVER.BASE_LR", "1e-3", "SOLVER.WEIGHT_DECAY", "0.0",
        )  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg).train()
        batch = [DatasetMapper(cfg, is_train=True)(dict(d)) for d in dicts]
        optimizer = build_optimizer(cfg, model)
        losses = []
        for _ in range(24):
            torch.manual_seed(len(losses))  # the same denoising noise in every run
            loss_dict = model(batch)
            optimizer.zero_grad()
            sum(loss_dict.values()).backward()
            optimizer.step()
            # GO-LSD's loss_ddf starts at 0 (equal untrained distributions) and grows as the
            # layers learn different boxes: the detection losses are what must fall.
            losses.append(sum(v.item() for k, v in loss_dict.items() if "_ddf" not in k))
        self.assertLess(sum(losses[-3:]) / 3, 0.8 * sum(losses[:3]) / 3, losses)


if __name__ == "__main__":
    unittest.main()
