# Copyright (c) kd_detr contributors.
"""DETR pieces: box ops, Hungarian matcher, set criterion, position encoding and the meta-arch.

Expected values are computed here from explicit formulas, not with the code under test.
"""
import itertools
import math
import os
import unittest
from unittest import mock

import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from kd_detr.config import load_config
from kd_detr.modeling import box_ops
from kd_detr.modeling.criterion import SetCriterion
from kd_detr.modeling.matcher import HungarianMatcher
from kd_detr.modeling.meta_arch import DETR
from kd_detr.modeling.num_classes import check_num_classes
from kd_detr.modeling.position_encoding import PositionEmbeddingSine
from kd_detr.modeling.transformer import DETRTransformer, MultiheadAttention

from .common import REPO_ROOT
from .model_helpers import config_from

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")
# Smaller than the parity model; FREEZE_AT 0 so that every backbone conv must get a gradient.
_TINY = {
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.DETR.HIDDEN_DIM": 32,
    "MODEL.DETR.NHEADS": 4,
    "MODEL.DETR.DIM_FEEDFORWARD": 64,
    "MODEL.DETR.ENC_LAYERS": 1,
    "MODEL.DETR.DEC_LAYERS": 2,
    "MODEL.DETR.NUM_QUERIES": 6,
    "MODEL.DETR.NUM_CLASSES": 3,
    "MODEL.DETR.DROPOUT": 0.0,
}
TINY = [str(x) for item in _TINY.items() for x in item]


def _xyxy(b):
    cx, cy, w, h = b
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _giou(a, b):
    """GIoU of two xyxy boxes (python floats)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _random_boxes(gen, *shape):
    """(*shape, 4) valid normalised cxcywh boxes."""
    cxcy = torch.rand(*shape, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(*shape, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([cxcy, wh], -1)


def _random_targets(gen, num, num_classes=3):
    labels = torch.randint(0, num_classes, (num,), generator=gen)
    return {"labels": labels, "boxes": _random_boxes(gen, num)}


class _FixedMatcher:
    def __init__(self, indices):
        self.indices = indices

    def __call__(self, outputs, targets):
        return self.indices


def _build(opts=(), cfg_hook=None):
    cfg = config_from(CONFIG, *TINY, *opts)
    if cfg_hook is not None:
        cfg_hook(cfg)
    return build_model(cfg)


def _batch(gen, with_boxes=(3, 0)):
    batch = []
    for (h, w), num in zip(((64, 96), (80, 64)), with_boxes):
        inst = Instances((h, w))
        xy = torch.rand(num, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], 1))
        inst.gt_classes = torch.randint(0, 3, (num,), generator=gen)
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": 2 * h, "width": 2 * w})
    return batch


class TestBoxOps(unittest.TestCase):
    def test_conversions_and_giou(self):
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
        xyxy = box_ops.box_cxcywh_to_xyxy(boxes)
        torch.testing.assert_close(xyxy[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
        torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(xyxy), boxes)
        other = box_ops.box_cxcywh_to_xyxy(torch.tensor([[0.55, 0.5, 0.2, 0.2]]))
        giou = box_ops.generalized_box_iou(xyxy, other)
        self.assertEqual(giou.shape, (2, 1))
        for i in range(2):
            expected = _giou(tuple(xyxy[i].tolist()), tuple(other[0].tolist()))
            self.assertAlmostEqual(giou[i, 0].item(), expected, places=6)
        paired = box_ops.paired_generalized_box_iou(xyxy, other.expand(2, 4))
        torch.testing.assert_close(paired, giou[:, 0])
        iou = box_ops.box_iou(xyxy, other)[0][:, 0]
        torch.testing.assert_close(box_ops.paired_box_iou(xyxy, other.expand(2, 4)), iou)
        batched = box_ops.paired_box_iou(torch.stack([xyxy, xyxy]), other.expand(2, 2, 4))
        torch.testing.assert_close(batched, torch.stack([iou, iou]))  # (..., 4) boxes
        self.assertAlmostEqual(box_ops.generalized_box_iou(xyxy, xyxy)[0, 0].item(), 1.0, places=6)

    def test_empty(self):
        empty, one = torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        self.assertEqual(box_ops.generalized_box_iou(empty, one).shape, (0, 1))
        self.assertEqual(box_ops.box_iou(one, empty)[0].shape, (1, 0))
        self.assertEqual(box_ops.paired_generalized_box_iou(empty, empty).shape, (0,))
        self.assertEqual(box_ops.paired_box_iou(empty, empty).shape, (0,))
        zero = torch.zeros(1, 4)  # both empty: 0, not 0 / 0
        self.assertEqual(box_ops.paired_box_iou(zero, zero).tolist(), [0.0])
        self.assertEqual(box_ops.box_cxcywh_to_xyxy(empty).shape, (0, 4))


class TestPositionEncoding(unittest.TestCase):
    def test_matches_formula_with_per_axis_temperature(self):
        mask = torch.zeros(1, 3, 4, dtype=torch.bool)
        mask[0, :, 3] = True  # last column is padding
        pe = PositionEmbeddingSine(4, normalize=True, temperature_h=20, temperature_w=10000)
        out = pe(mask)
        self.assertEqual(out.shape, (1, 8, 3, 4))
        y, x = 2, 1  # row 2 of 3 valid rows, column 1 of 3 valid columns
        pos_y, pos_x = (y + 1) / 3 * 2 * math.pi, (x + 1) / 3 * 2 * math.pi
        for i in range(4):
            fn = math.sin if i % 2 == 0 else math.cos
            self.assertAlmostEqual(out[0, i, y, x].item(), fn(pos_y / 20 ** (2 * (i // 2) / 4)), 5)
            angle = pos_x / 10000 ** (2 * (i // 2) / 4)
            self.assertAlmostEqual(out[0, 4 + i, y, x].item(), fn(angle), 5)


class TestMatcher(unittest.TestCase):
    def _explicit_cost(self, logits, boxes, tgt, focal):
        q, t = logits.shape[0], len(tgt["labels"])
        cost = torch.zeros(q, t, dtype=torch.float64)
        for i, j in itertools.product(range(q), range(t)):
            c = int(tgt["labels"][j])
            if focal:
                p = _sigmoid(float(logits[i, c]))
                pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
                neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
                cls = pos - neg
            else:
                z = logits[i].double()
                cls = -float(z.exp()[c] / z.exp().sum())
            l1 = float((boxes[i] - tgt["boxes"][j]).abs().sum())
            giou = _giou(_xyxy(boxes[i].tolist()), _xyxy(tgt["boxes"][j].tolist()))
            cost[i, j] = 2 * cls + 5 * l1 - 2 * giou
        return cost

    def _brute_force(self, cost):
        q, t = cost.shape
        if q >= t:  # every target gets a distinct query
            perms = itertools.permutations(range(q), t)
            return min(sum(cost[p[j], j] for j in range(t)) for p in perms)
        perms = itertools.permutations(range(t), q)  # every query gets a distinct target
        return min(sum(cost[i, p[i]] for i in range(q)) for p in perms)

    def test_equals_brute_force(self):
        gen = torch.Generator().manual_seed(0)
        for focal in (False, True):
            matcher = HungarianMatcher(2.0, 5.0, 2.0, use_focal=focal)
            for num_queries, num_targets in ((5, 3), (4, 4), (3, 5), (4, 0), (6, 1)):
                logits = torch.randn(1, num_queries, 3 if focal else 4, generator=gen) * 2
                boxes = _random_boxes(gen, 1, num_queries)
                tgt = _random_targets(gen, num_targets)
                rows, cols = matcher({"pred_logits": logits, "pred_boxes": boxes}, [tgt])[0]
                self.assertEqual(len(rows), min(num_queries, num_targets))
                self.assertEqual(rows.dtype, torch.int64)
                if num_targets == 0:
                    continue
                self.assertEqual(len(set(rows.tolist())), len(rows))
                self.assertEqual(len(set(cols.tolist())), len(cols))
                cost = self._explicit_cost(logits[0], boxes[0], tgt, focal)
                total = float(sum(cost[i, j] for i, j in zip(rows.tolist(), cols.tolist())))
                self.assertAlmostEqual(total, float(self._brute_force(cost)), places=4)

    def test_per_image_batch(self):
        gen = torch.Generator().manual_seed(1)
        matcher = HungarianMatcher()
        outputs = {"pred_logits": torch.randn(3, 4, 4, generator=gen)}
        outputs["pred_boxes"] = torch.rand(3, 4, 4, generator=gen) * 0.3 + 0.2
        targets = [_random_targets(gen, n) for n in (2, 0, 4)]
        batched = matcher(outputs, targets)
        for i, tgt in enumerate(targets):
            single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [tgt])[0]
            self.assertTrue(torch.equal(batched[i][0], single[0]))
            self.assertTrue(torch.equal(batched[i][1], single[1]))


class TestCriterion(unittest.TestCase):
    pred_boxes = [[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.1, 0.4]]
    tgt_boxes = [[0.35, 0.45, 0.25, 0.25], [0.65, 0.55, 0.15, 0.35]]

    def _inputs(self, num_logits):
        logits = torch.tensor([[0.2, -1.0, 0.5, 1.5], [2.0, 0.1, -0.3, 0.0], [-0.5, 1.2, 0.3, 0.4]])
        outputs = {
            "pred_logits": logits[None, :, :num_logits].clone().requires_grad_(),
            "pred_boxes": torch.tensor([self.pred_boxes]),
        }
        targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor(self.tgt_boxes)}]
        indices = [(torch.tensor([1, 2]), torch.tensor([0, 1]))]  # query 1 -> target 0, 2 -> 1
        return outputs, targets, indices

    def _box_losses(self, losses, num_boxes=2):
        l1 = giou = 0.0
        for q, j in ((1, 0), (2, 1)):  # matched (query, target) pairs
            pred, tgt = self.pred_boxes[q], self.tgt_boxes[j]
            l1 += sum(abs(p - t) for p, t in zip(pred, tgt))
            giou += 1 - _giou(_xyxy(pred), _xyxy(tgt))
        self.assertAlmostEqual(losses["loss_bbox"].item(), l1 / num_boxes, places=5)
        self.assertAlmostEqual(losses["loss_giou"].item(), giou / num_boxes, places=5)

    def test_cross_entropy_l1_giou_by_hand(self):
        outputs, targets, indices = self._inputs(4)
        outputs["aux_outputs"] = [{k: v.detach() for k, v in outputs.items()}]
        crit = SetCriterion(3, _FixedMatcher(indices), {}, eos_coef=0.1)
        losses = crit(outputs, targets)
        self.assertEqual(
            sorted(losses),
            ["loss_bbox", "loss_bbox_0", "loss_class", "loss_class_0", "loss_giou", "loss_giou_0"],
        )
        logits = outputs["pred_logits"][0].tolist()
        target_class = [3, 0, 2]  # query 0 unmatched -> "no object" (index 3)
        weights = [0.1 if c == 3 else 1.0 for c in target_class]
        nll = [math.log(sum(math.exp(v) for v in z)) - z[c] for z, c in zip(logits, target_class)]
        expected = sum(w * n for w, n in zip(weights, nll)) / sum(weights)
        self.assertAlmostEqual(losses["loss_class"].item(), expected, places=5)
        self._box_losses(losses)
        self.assertAlmostEqual(losses["loss_class_0"].item(), expected, places=5)

    def test_focal_loss_by_hand(self):
        outputs, targets, indices = self._inputs(3)
        crit = SetCriterion(3, _FixedMatcher(indices), {}, use_focal=True, focal_alpha=0.25)
        losses = crit(outputs, targets)
        onehot = {(1, 0): 1.0, (2, 2): 1.0}
        expected = 0.0
        for q, c in itertools.product(range(3), range(3)):
            z, t = outputs["pred_logits"][0, q, c].item(), onehot.get((q, c), 0.0)
            p = _sigmoid(z)
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            alpha_t = 0.25 * t + 0.75 * (1 - t)
            expected += alpha_t * (1 - p_t) ** 2 * ce
        # DAB/Deformable: loss.mean(1).sum() / num_boxes * num_queries == sum / num_boxes.
        self.assertAlmostEqual(losses["loss_class"].item(), expected / 2, places=5)
        self._box_losses(losses)

    def test_no_targets_and_metrics(self):
        outputs, _, _ = self._inputs(4)
        targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
        crit = SetCriterion(3, HungarianMatcher(), {})
        losses = crit(outputs, targets)  # no EventStorage: metrics are skipped
        self.assertEqual(losses["loss_bbox"].item(), 0.0)
        self.assertTrue(torch.isfinite(losses["loss_class"]))
        outputs, targets, _ = self._inputs(4)
        with EventStorage() as storage:
            losses = crit(outputs, targets)
            latest = storage.latest()
        self.assertIn("class_error", latest)
        self.assertIn("cardinality_error", latest)
        self.assertTrue(all(k.startswith("loss_") for k in losses))

    def test_num_boxes_all_reduced(self):
        crit = SetCriterion(3, HungarianMatcher(), {})
        _, targets, _ = self._inputs(4)
        world = "kd_detr.modeling.criterion.comm.get_world_size"
        with mock.patch(world, return_value=2), mock.patch(
            "torch.distributed.all_reduce", side_effect=lambda t: t.mul_(3)
        ) as all_reduce:
            self.assertEqual(crit.get_num_boxes(targets, torch.device("cpu")), 3.0)  # 2 * 3 / 2
            targets[0] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
            self.assertEqual(crit.get_num_boxes(targets, torch.device("cpu")), 1.0)  # clamped
        self.assertEqual(all_reduce.call_count, 2)


class TestTransformer(unittest.TestCase):
    def test_attention_paths_and_padding(self):
        torch.manual_seed(0)
        attn = MultiheadAttention(16, 4).eval()
        q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
        pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
        out = attn(q, kv, kv, key_padding_mask=pad)
        out_w, weights = attn(q, kv, kv, key_padding_mask=pad, need_weights=True)
        torch.testing.assert_close(out, out_w)
        self.assertEqual(weights[1, :, :, 3:].abs().max().item(), 0.0)  # padded keys unused
        kv2 = kv.clone()
        kv2[1, 3:] = 100.0  # changing padded keys does not change the output
        torch.testing.assert_close(attn(q, kv2, kv2, key_padding_mask=pad), out)

    def test_pre_norm_and_intermediate_outputs(self):
        for pre_norm in (False, True):
            kwargs = dict(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=3)
            tr = DETRTransformer(**kwargs, dim_feedforward=32, dropout=0.0, pre_norm=pre_norm)
            self.assertEqual(tr.encoder.norm is not None, pre_norm)
            src, pos = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
            query_pos = torch.randn(2, 4, 16)
            pad = torch.zeros(2, 7, dtype=torch.bool)
            hs, memory = tr(src, pos, pad, query_pos)
            self.assertEqual(hs.shape, (3, 2, 4, 16))
            self.assertEqual(memory.shape, (2, 7, 16))
            torch.testing.assert_close(hs.mean(-1), torch.zeros(3, 2, 4), atol=1e-5, rtol=0)


class TestDETR(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.model = _build()
        cls.gen = torch.Generator().manual_seed(0)
        cls.batch = _batch(cls.gen)

    def setUp(self):
        self.model.group_decoding = "separate"

    def test_train_losses_reach_every_parameter(self):
        self.model.train()
        self.model.zero_grad()
        with EventStorage():
            losses = self.model(self.batch)
        self.assertEqual(len(losses), 6)  # 3 losses x 2 decoder layers
        self.assertTrue(all(k.startswith("loss_") for k in losses))
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))
        sum(losses.values()).backward()
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.assertGreater(len([n for n, _ in trainable if n.startswith("backbone.stem")]), 0)
        self.assertEqual([n for n, p in trainable if p.grad is None], [])
        # DETR's first decoder layer sees all-zero content queries, so its self-attention output
        # is a constant: only there may gradients be exactly zero.
        zero = [n for n, p in trainable if not p.grad.abs().sum() > 0]
        first = ("transformer.decoder.layers.0.self_attn.", "transformer.decoder.layers.0.norm1.")
        self.assertEqual([n for n in zero if not n.startswith(first)], [])

    def test_eval_boxes_in_original_coordinates(self):
        self.model.eval()
        with torch.no_grad():
            results = self.model(self.batch)
            raw = self.model.forward_raw(self.model.preprocess_image(self.batch))
        for i, inputs in enumerate(self.batch):
            inst = results[i]["instances"]
            h, w = inputs["image"].shape[1:]
            self.assertEqual(inst.image_size, (2 * h, 2 * w))
            self.assertEqual(len(inst), 6)
            prob = raw["pred_logits"][i].softmax(-1)[:, :-1]
            scores, labels = prob.max(-1)
            order = scores.argsort(descending=True)
            torch.testing.assert_close(inst.scores, scores[order])
            self.assertTrue(torch.equal(inst.pred_classes, labels[order]))
            cx, cy, bw, bh = raw["pred_boxes"][i, order].unbind(-1)
            expected = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            expected = expected * torch.tensor([2 * w, 2 * h, 2 * w, 2 * h])
            expected[:, 0::2] = expected[:, 0::2].clamp(0, 2 * w)
            expected[:, 1::2] = expected[:, 1::2].clamp(0, 2 * h)
            torch.testing.assert_close(inst.pred_boxes.tensor, expected)

    def test_forward_raw_accepts_tensor_and_mask(self):
        self.model.eval()
        images = self.model.preprocess_image(self.batch)
        mask = torch.ones(images.tensor.shape[0], *images.tensor.shape[2:], dtype=torch.bool)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :h, :w] = False
        with torch.no_grad():
            a = self.model.forward_raw(images)
            b = self.model.forward_raw((images.tensor, mask))
        self.assertTrue(torch.equal(a["pred_logits"], b["pred_logits"]))
        self.assertEqual(a["layers"]["pred_boxes"].shape, (2, 2, 6, 4))
        self.assertEqual(a["pred_logits"].shape, (2, 6, 4))

    def test_class_count_validation(self):
        name = "kd_detr_test_detr_three_classes"
        if name not in MetadataCatalog.list():
            MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])

        def use_dataset(cfg):
            cfg.DATASETS.TRAIN = (name,)
            cfg.MODEL.DETR.NUM_CLASSES = 5

        with self.assertRaisesRegex(ValueError, rf"NUM_CLASSES is 5 .*'{name}' has 3"):
            _build(cfg_hook=use_dataset)
        cfg = load_config(freeze=False, register_datasets=False)
        cfg.DATASETS.TRAIN = (name,)
        cfg.MODEL.DETR.NUM_CLASSES = 3
        check_num_classes(cfg, "MODEL.DETR.NUM_CLASSES")  # matching count: no error

    def _groups(self):
        gen = torch.Generator().manual_seed(3)
        return [
            {"content": torch.randn(1, 5, 32, generator=gen)},  # content only, shared
            {"content": torch.randn(2, 3, 32, generator=gen), "pos": torch.randn(2, 3, 32)},
            {"pos": torch.randn(1, 4, 32, generator=gen)},
        ]

    def test_groups_shapes_and_errors(self):
        self.model.eval()
        images = self.model.preprocess_image(self.batch)
        with torch.no_grad():
            raw = self.model.forward_raw(images, self._groups())
        self.assertEqual(len(raw["groups"]), 3)
        for group, m in zip(raw["groups"], (5, 3, 4)):
            self.assertEqual(group["pred_logits"].shape, (2, 2, m, 4))  # (L, B, M, C + 1)
            self.assertEqual(group["pred_boxes"].shape, (2, 2, m, 4))
            self.assertEqual(group["hidden_states"].shape, (2, 2, m, 32))
        with self.assertRaisesRegex(ValueError, "DETR has no box queries.*DAB-DETR"):
            self.model.forward_raw(images, [{"boxes": torch.rand(1, 4, 4)}])
        with self.assertRaisesRegex(ValueError, "must be"):
            self.model.forward_raw(images, [{"content": torch.randn(3, 4, 32)}])
        with self.assertRaisesRegex(ValueError, "expected keys"):
            self.model.forward_raw(images, [{"query": torch.randn(1, 4, 32)}])

    def test_groups_do_not_change_detection_losses(self):
        self.model.train()
        images = self.model.preprocess_image(self.batch)
        targets = self.model.prepare_targets(self.batch, images.image_sizes)
        for mode in ("separate", "masked"):
            self.model.group_decoding = mode
            plain = self.model.losses(self.model.forward_raw(images), targets)
            grouped = self.model.losses(self.model.forward_raw(images, self._groups()), targets)
            self.assertEqual(sorted(plain), sorted(grouped))
            for k in plain:
                if mode == "separate":  # same computation: bit-identical
                    self.assertTrue(torch.equal(plain[k], grouped[k]), k)
                else:
                    torch.testing.assert_close(plain[k], grouped[k], rtol=1e-5, atol=1e-6)

    def test_groups_do_not_leak(self):
        self.model.eval()
        images = self.model.preprocess_image(self.batch)
        groups = self._groups()
        with torch.no_grad():
            outputs = {}
            for mode in ("separate", "masked"):
                self.model.group_decoding = mode
                together = self.model.forward_raw(images, groups)["groups"]
                alone = self.model.forward_raw(images, groups[1:2])["groups"][0]
                outputs[mode] = together
                for key in ("pred_logits", "pred_boxes"):
                    torch.testing.assert_close(together[1][key], alone[key], rtol=0, atol=1e-5)
        for g in range(3):
            torch.testing.assert_close(
                outputs["separate"][g]["pred_logits"], outputs["masked"][g]["pred_logits"]
            )


class TestDETRFocal(unittest.TestCase):
    def test_focal_head_and_inference(self):
        model = _build(["MODEL.DETR.USE_FOCAL_LOSS", "True", "MODEL.DETR.TEST_TOPK", "4"]).eval()
        self.assertIsInstance(model, DETR)
        self.assertEqual(model.class_embed.out_features, 3)  # no background logit
        batch = _batch(torch.Generator().manual_seed(1))
        with torch.no_grad():
            results = model(batch)
        self.assertEqual(len(results[0]["instances"]), 4)
        model.train()
        with EventStorage():
            losses = model(batch)
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))


if __name__ == "__main__":
    unittest.main()
