# Copyright (c) kd_detr contributors.
"""DN-DETR denoising for DAB-DETR: attention mask, isolation of the denoising queries, noise
statistics, contrastive (CDN) queries, losses against hand-computed values, training."""
import json
import math
import os
import tempfile
import unittest

import torch
from scipy import stats

from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from kd_detr.modeling.box_ops import box_cxcywh_to_xyxy
from kd_detr.modeling.denoising import (
    DenoisingGenerator,
    DenoisingQueries,
    denoising_attention_mask,
    denoising_losses,
    noise_boxes,
    noise_boxes_contrastive,
    noise_labels,
)

from .common import REPO_ROOT, tiny_demo_opts
from .model_helpers import config_from
from .test_dab_detr import groups_for, synthetic_batch, tiny_model

torch.set_num_threads(1)
DN = ("MODEL.DETR.DN.ENABLED", "True")


def _mask(rows):
    return torch.tensor([[c == "x" for c in row.replace(" ", "")] for row in rows])


class TestAttentionMask(unittest.TestCase):
    def test_exact_matrix_two_groups_matching_and_kd_group(self):
        # 2 denoising groups of 2, 3 matching queries, 1 distillation group of 2; x = blocked.
        expected = _mask(
            [
                ".. xx ... xx",  # group 0: itself + matching
                ".. xx ... xx",
                "xx .. ... xx",  # group 1
                "xx .. ... xx",
                "xx xx ... xx",  # matching: only matching
                "xx xx ... xx",
                "xx xx ... xx",
                "xx xx xxx ..",  # distillation group: only itself
                "xx xx xxx ..",
            ]
        )
        mask = denoising_attention_mask(2, 2, 3, [2])
        self.assertTrue(torch.equal(mask, expected), f"\n{mask.int()}")

    def test_padded_slots_are_hidden_per_image(self):
        valid = torch.tensor([[True, True, True, True], [True, False, True, False]])
        mask = denoising_attention_mask(2, 2, 1, valid=valid)
        self.assertEqual(tuple(mask.shape), (2, 5, 5))
        self.assertTrue(torch.equal(mask[0], denoising_attention_mask(2, 2, 1)))
        expected_1 = _mask([".x xx .", ".x xx .", "xx .x .", "xx .x .", "xx xx ."])
        self.assertTrue(torch.equal(mask[1], expected_1), f"\n{mask[1].int()}")
        with self.assertRaisesRegex(ValueError, "valid must be"):
            denoising_attention_mask(2, 2, 1, valid=valid[:, :3])


def _targets():
    return [
        {
            "labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]]),
        },
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.6]])},
    ]


class TestDenoisingQueries(unittest.TestCase):
    def test_layout_of_dn_groups(self):
        gen = DenoisingGenerator(5, 64, num_groups=3, label_noise_ratio=0, box_noise_scale=0)
        q = gen(_targets())
        self.assertEqual((q.num_groups, q.group_size, q.num_queries), (3, 2, 6))
        self.assertEqual(tuple(q.content.shape), (2, 6, 64))
        self.assertTrue(torch.equal(q.valid[1], torch.tensor([True, False] * 3)))
        self.assertTrue(torch.equal(q.positive, q.valid))
        self.assertTrue(torch.equal(q.target_labels[0], torch.tensor([1, 3] * 3)))
        self.assertTrue(torch.equal(q.target_labels[1], torch.tensor([0, 5] * 3)))  # 5 = pad
        torch.testing.assert_close(q.boxes[0, 2:4], _targets()[0]["boxes"])  # no noise
        # content = label embedding + indicator 1; padding content is zero
        torch.testing.assert_close(q.content[0, 1, :63], gen.label_enc.weight[3])
        self.assertEqual(q.content[0, 1, 63].item(), 1.0)
        self.assertEqual(q.content[1, 1].abs().sum().item(), 0.0)
        matching = gen.matching_content(4)
        torch.testing.assert_close(matching[:, :63], gen.label_enc.weight[5].expand(4, -1))
        self.assertEqual(matching[:, 63].abs().sum().item(), 0.0)
        self.assertIsNone(gen([{"labels": torch.zeros(0).long(), "boxes": torch.zeros(0, 4)}]))

    def test_layout_of_cdn_groups_and_query_budget(self):
        gen = DenoisingGenerator(5, 64, num_queries=5, contrastive=True, with_indicator=False)
        q = gen(_targets(), generator=torch.Generator().manual_seed(0))
        # budget 5 // 2 objects = 2 groups of [2 positives | 2 negatives]
        self.assertEqual((q.num_groups, q.group_size), (2, 4))
        self.assertEqual(gen.label_enc.weight.shape, (6, 64))
        positive = torch.tensor([True, True, False, False] * 2)
        self.assertTrue(torch.equal(q.positive[0], positive))
        self.assertTrue(torch.equal(q.valid[1], torch.tensor([True, False] * 4)))
        self.assertTrue(torch.equal(q.positive[1], torch.tensor([True, False, False, False] * 2)))
        # negatives target their own object's box (the "no object" class comes from `positive`)
        torch.testing.assert_close(q.target_boxes[0, 6], _targets()[0]["boxes"][0])

    def test_invalid_settings(self):
        for kwargs in ({"num_groups": 0}, {"label_noise_ratio": 1.5}, {"box_noise_scale": -1}):
            with self.assertRaises(ValueError):
                DenoisingGenerator(5, 64, **kwargs)


class TestNoiseStatistics(unittest.TestCase):
    """Many samples against the distributions' exact moments (tolerance 5 standard errors)."""

    n = 20000

    def boxes(self):
        gen = torch.Generator().manual_seed(0)
        wh = 0.1 + 0.1 * torch.rand(self.n, 2, generator=gen)
        return torch.cat([torch.full((self.n, 2), 0.5), wh], 1), gen  # never clamped

    def test_dn_box_noise_within_and_matching_theory(self):
        lam = 0.4
        boxes, gen = self.boxes()
        noised = noise_boxes(boxes, lam, gen)
        shift = (noised[:, :2] - boxes[:, :2]).abs() / (boxes[:, 2:] / 2)  # U[0, lambda]
        scale = noised[:, 2:] / boxes[:, 2:]  # U[1 - lambda, 1 + lambda]
        self.assertLessEqual(shift.max().item(), lam + 1e-5)
        self.assertGreaterEqual(scale.min().item(), 1 - lam - 1e-5)
        self.assertLessEqual(scale.max().item(), 1 + lam + 1e-5)
        se = lam / math.sqrt(12) / math.sqrt(2 * self.n)
        self.assertAlmostEqual(shift.mean().item(), lam / 2, delta=5 * se)
        self.assertAlmostEqual((scale - 1).abs().mean().item(), lam / 2, delta=5 * se)
        self.assertAlmostEqual(scale.mean().item(), 1.0, delta=5 * 2 * se)
        edge = noise_boxes(torch.tensor([[0.99, 0.01, 0.5, 0.9]]).repeat(100, 1), 0.4, gen)
        self.assertTrue(((edge >= 0) & (edge <= 1)).all())

    def test_label_flip_rate_is_binomial(self):
        gen = torch.Generator().manual_seed(1)
        labels = torch.randint(0, 5, (self.n,), generator=gen)
        noised = noise_labels(labels, 0.2, 5, gen)
        changed = int((noised != labels).sum())
        # resampled with probability 0.2, to one of the 4 other classes with probability 4/5
        test = stats.binomtest(changed, self.n, 0.2 * 4 / 5)
        self.assertGreater(test.pvalue, 1e-4, changed / self.n)
        self.assertTrue(((noised >= 0) & (noised < 5)).all())
        self.assertTrue(torch.equal(noise_labels(labels, 0.0, 5, gen), labels))

    def test_cdn_negatives_are_farther_than_positives(self):
        lam = 0.4
        boxes, gen = self.boxes()
        negative = torch.arange(self.n) % 2 == 1
        noised = noise_boxes_contrastive(boxes, lam, negative, gen)
        half = boxes[:, 2:].repeat(1, 2) / 2
        shift = (box_cxcywh_to_xyxy(noised) - box_cxcywh_to_xyxy(boxes)).abs() / (lam * half)
        pos, neg = shift[~negative], shift[negative]
        self.assertLess(pos.max().item(), 1 + 1e-4)  # |corner shift| < lambda * size / 2
        self.assertGreater(neg.min().item(), 1 - 1e-4)  # in [lambda, 2 lambda) * size / 2
        self.assertLess(neg.max().item(), 2 + 1e-4)
        se = 1 / math.sqrt(12) / math.sqrt(pos.numel())
        self.assertAlmostEqual(pos.mean().item(), 0.5, delta=5 * se)
        self.assertAlmostEqual(neg.mean().item(), 1.5, delta=5 * se)


def _focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    if target:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p**gamma * -math.log(1 - p)


class TestDenoisingLosses(unittest.TestCase):
    def queries(self, positive):
        n = len(positive)
        return DenoisingQueries(
            content=torch.zeros(1, n, 4),
            boxes=torch.zeros(1, n, 4),
            noised_labels=torch.zeros(1, n).long(),
            target_labels=torch.tensor([[0] * n]),
            target_boxes=torch.tensor([[[0.5, 0.5, 0.4, 0.2]] * n]),
            valid=torch.tensor([[True] * (n - 1) + [False]]),  # last slot: padding
            positive=torch.tensor([positive]),
            num_groups=1,
            group_size=n,
        )

    def test_dn_and_cdn_losses_by_hand(self):
        # slots: positive, negative (CDN), padding; 2 classes, 2 layers
        logits = torch.tensor([[[[0.5, -1.0], [2.0, 0.3], [9.0, 9.0]]]]).repeat(2, 1, 1, 1)
        boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.5] * 4]]])
        boxes = boxes.repeat(2, 1, 1, 1)
        logits[0] += 1.0  # layer 0 differs
        num_boxes = 2.0
        losses = denoising_losses(logits, boxes, self.queries([True, False, False]), num_boxes)
        self.assertEqual(
            sorted(losses),
            sorted(f"loss_{k}_dn{s}" for k in ("class", "bbox", "giou") for s in ("", "_0")),
        )
        for layer, suffix in ((1, ""), (0, "_0")):
            lg = logits[layer, 0].tolist()
            cls = _focal(lg[0][0], 1) + _focal(lg[0][1], 0) + _focal(lg[1][0], 0)
            cls += _focal(lg[1][1], 0)  # negative: "no object", all zero targets
            self.assertAlmostEqual(losses[f"loss_class_dn{suffix}"].item(), cls / 2, places=5)
            # (0.5, 0.5, 0.2, 0.2) vs (0.5, 0.5, 0.4, 0.2): L1 0.2; IoU 0.04 / 0.08 = 0.5 and the
            # enclosing box is the union, so GIoU = 0.5
            self.assertAlmostEqual(losses[f"loss_bbox_dn{suffix}"].item(), 0.2 / 2, places=6)
            self.assertAlmostEqual(losses[f"loss_giou_dn{suffix}"].item(), 0.5 / 2, places=6)
        queries = self.queries([True, False, False])
        last = denoising_losses(logits, boxes, queries, 2.0, all_layers=False)
        self.assertEqual(sorted(last), ["loss_bbox_dn", "loss_class_dn", "loss_giou_dn"])


class TestDNDABDETR(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_model(*DN).eval()
        cls.batch = synthetic_batch()
        cls.images = cls.model.preprocess_image(cls.batch)
        cls.targets = cls.model.prepare_targets(cls.batch, cls.images.image_sizes)

    def raw(self, groups=None, denoising=None, decoding="masked"):
        self.model.group_decoding = decoding
        with torch.no_grad():
            return self.model.forward_raw(self.images, groups, denoising)

    def dn_queries(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return self.model.denoising(self.targets, generator=gen)

    def perturbed(self, q, slots, seed=5):
        """Copy of ``q`` with new random boxes and labels (content) on ``slots`` of every image."""
        gen = torch.Generator().manual_seed(seed)
        boxes, labels = q.boxes.clone(), q.noised_labels.clone()
        boxes[:, slots] = 0.2 + 0.6 * torch.rand(boxes[:, slots].shape, generator=gen)
        labels[:, slots] = torch.randint(0, 5, labels[:, slots].shape, generator=gen)
        content = q.content.clone()
        with torch.no_grad():
            content[:, slots] = self.model.denoising.embed_labels(labels[:, slots])
        return DenoisingQueries(**dict(vars(q), boxes=boxes, noised_labels=labels, content=content))

    def test_dn_queries_do_not_leak(self):
        q = self.dn_queries()
        self.assertEqual((q.num_groups, q.group_size), (5, 2))
        other = self.perturbed(q, slice(0, q.num_queries))
        half = self.perturbed(q, slice(2, q.num_queries))  # every group but group 0
        for decoding in ("masked", "separate"):
            a = self.raw(groups_for(), q, decoding)
            b = self.raw(groups_for(), other, decoding)
            c = self.raw(groups_for(), half, decoding)
            for key in ("pred_logits", "pred_boxes", "hidden_states", "reference_boxes"):
                self.assertTrue(torch.equal(a["layers"][key], b["layers"][key]), key)
                for ga, gb in zip(a["groups"], b["groups"]):
                    self.assertTrue(torch.equal(ga[key], gb[key]), f"{decoding} group {key}")
                # denoising groups do not see each other
                dn_a, dn_c = a["denoising"][key][:, :, :2], c["denoising"][key][:, :, :2]
                self.assertTrue(torch.equal(dn_a, dn_c), f"{decoding} dn group 0 {key}")
            # the perturbation is visible where it may be
            dn_a, dn_b = a["denoising"]["pred_boxes"], b["denoising"]["pred_boxes"]
            self.assertFalse(torch.equal(dn_a, dn_b))
            plain = self.raw(groups_for(), None, decoding)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(a["layers"][key], plain["layers"][key])
                torch.testing.assert_close(a["groups"][1][key], plain["groups"][1][key])

    def test_padded_slots_do_not_reach_real_denoising_queries(self):
        q = self.dn_queries()
        pad = ~q.valid[1]  # image 1 has 1 object, image 0 has 2: one padded slot per group
        boxes, content = q.boxes.clone(), q.content.clone()
        boxes[1, pad] = torch.tensor([0.3, 0.7, 0.2, 0.1])
        content[1, pad] = 1.0
        changed = DenoisingQueries(**dict(vars(q), boxes=boxes, content=content))
        a, b = self.raw(None, q)["denoising"], self.raw(None, changed)["denoising"]
        valid = q.valid[1]
        self.assertTrue(torch.equal(a["pred_boxes"][:, 1, valid], b["pred_boxes"][:, 1, valid]))
        self.assertTrue(torch.equal(a["pred_boxes"][:, 0], b["pred_boxes"][:, 0]))

    def test_training_losses_weights_and_gradients(self):
        model = tiny_model(*DN).train()
        torch.manual_seed(0)
        losses = model(self.batch)
        for name in ("class", "bbox", "giou"):
            self.assertIn(f"loss_{name}_dn", losses)
            self.assertIn(f"loss_{name}_dn_0", losses)
        self.assertEqual(model.criterion.weight_dict["loss_bbox_dn_0"], 5.0)
        sum(losses.values()).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        self.assertEqual(unused, [])
        self.assertGreater(model.denoising.label_enc.weight.grad[:5].abs().sum().item(), 0)
        # the DN losses are the weighted hand-checked losses of the returned DN outputs
        torch.manual_seed(0)
        images = model.preprocess_image(self.batch)
        targets = model.prepare_targets(self.batch, images.image_sizes)
        with torch.no_grad():
            out = model.forward_raw(images, None, model.denoising(targets))
            again = model.losses(out, targets)
            dn = out["denoising"]
            raw = denoising_losses(dn["pred_logits"], dn["pred_boxes"], dn["queries"], 3.0)
        for key, value in raw.items():
            torch.testing.assert_close(again[key], value * model.criterion.weight_dict[key])
        empty = [dict(self.batch[0], instances=self.batch[0]["instances"][:0])]
        self.assertEqual(set(model(empty)), set(losses))  # same keys without objects

    def test_inference_and_kd_contract_unchanged(self):
        with torch.no_grad():
            out = self.model.forward_raw(self.images, groups_for())
            results = self.model(self.batch)
        self.assertNotIn("denoising", out)
        self.assertEqual(len(results[0]["instances"]), 20)
        expected = ["aux_outputs", "encoder", "groups", "layers", "pred_boxes", "pred_logits"]
        self.assertEqual(sorted(out), expected)
        # without content a group gets the detection queries' content ("no object" embedding),
        # so a group on the detection anchors reproduces the detections
        anchors = self.model.refpoint_embed.weight.sigmoid()[None]
        out = self.raw([{"boxes": anchors}], decoding="separate")
        torch.testing.assert_close(out["groups"][0]["pred_logits"], out["layers"]["pred_logits"])

    def test_config_errors(self):
        with self.assertRaisesRegex(ValueError, "NUM_PATTERNS"):
            tiny_model(*DN, "MODEL.DETR.DAB.NUM_PATTERNS", "2")


class TestDNRecipeAndTraining(unittest.TestCase):
    def test_recipe_matches_dab_detr_schedule(self):
        configs = os.path.join(REPO_ROOT, "configs", "dab_detr")
        dn_config = os.path.join(configs, "dn_dab_detr_R_50_50ep_coco.yaml")
        dn = config_from(dn_config, "MODEL.DEVICE", "cpu")
        dab = config_from(os.path.join(configs, "dab_detr_R_50_50ep_coco.yaml"))
        self.assertTrue(dn.MODEL.DETR.DN.ENABLED)
        settings = dn.MODEL.DETR.DN
        self.assertEqual((settings.NUM_GROUPS, settings.LABEL_NOISE_RATIO), (5, 0.2))
        self.assertEqual(settings.BOX_NOISE_SCALE, 0.4)
        for key in ("MAX_ITER", "STEPS", "BASE_LR", "IMS_PER_BATCH", "OPTIMIZER"):
            self.assertEqual(dn.SOLVER[key], dab.SOLVER[key], key)
        model = build_model(dn)
        self.assertEqual(tuple(model.denoising.label_enc.weight.shape), (81, 255))

    def test_train_net_on_demo_data(self):
        import train_net

        config = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite0_demo.yaml")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "train")
            opts = ["MODEL.DETR.DN.ENABLED", "True", "OUTPUT_DIR", out] + tiny_demo_opts(
                os.path.join(tmp, "data"), iters=3, warmup=1, steps="(2,)"
            )
            args = default_argument_parser().parse_args(["--config-file", config, *opts])
            train_net.main(args)
            with open(os.path.join(out, "metrics.json")) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            with open(os.path.join(out, "metrics_final.json")) as f:
                final = json.load(f)
        logged = [line for line in lines if "loss_giou_dn" in line]
        self.assertTrue(logged, lines)
        self.assertTrue(all(math.isfinite(line["total_loss"]) for line in logged))
        self.assertIn("AP", final["results"]["kd_demo_val"]["bbox"])


if __name__ == "__main__":
    unittest.main()
