# Copyright (c) kd_detr contributors.
"""DeformableDETR (plain, box refinement, two-stage): multi-scale inputs, references, losses,
inference and extra query groups (tiny CPU models)."""
import copy
import math
import os
import unittest

import torch

from detectron2.modeling import build_model

from kd_detr.modeling.meta_arch import DeformableDETR  # noqa: F401  (registers the model)
from kd_detr.modeling.transformer.deformable_transformer import (
    encoder_reference_points,
    valid_ratios,
)

from .common import REPO_ROOT
from .model_helpers import (
    config_from,
    perturb_box_heads,
    perturb_deformable_attention,
    single_thread_module,
)
from .test_dab_detr import synthetic_batch

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")
VARIANTS = {
    "plain": [],
    "refine": ["MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True"],
    "two_stage": [
        "MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True",
        "MODEL.DETR.DEFORMABLE.TWO_STAGE", "True",
    ],
}  # fmt: skip


setUpModule, tearDownModule = single_thread_module()


def tiny_cfg(*opts):
    return config_from(CONFIG, *opts)


def tiny_model(variant="plain", *opts, seed=0):
    """Tiny model whose zero-initialised box-head outputs and attention weights are perturbed,
    so that boxes move and every gradient is non-zero."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(*VARIANTS[variant], *opts))
    perturb_box_heads(model._heads()[1])
    perturb_deformable_attention(model)
    return model


def groups_for(batch_size=2, d=64):
    gen = torch.Generator().manual_seed(3)
    return [
        {"boxes": torch.rand(1, 6, 4, generator=gen) * 0.5 + 0.25},
        {
            "boxes": torch.rand(batch_size, 4, 4, generator=gen) * 0.5 + 0.25,
            "content": torch.randn(batch_size, 4, d, generator=gen),
        },
    ]


class TestDeformableDETR(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.models = {name: tiny_model(name).eval() for name in VARIANTS}
        cls.batch = synthetic_batch()
        cls.images = cls.models["plain"].preprocess_image(cls.batch)
        cls.targets = cls.models["plain"].prepare_targets(cls.batch, cls.images.image_sizes)

    def raw(self, variant, groups=None, decoding="separate", model=None):
        model = model or self.models[variant]
        model.group_decoding = decoding
        with torch.no_grad():
            return model.forward_raw(self.images, groups)

    def test_levels_masks_and_valid_ratios(self):
        model = self.models["plain"]
        with torch.no_grad():
            encoded = model.encode(self.images)
        # 64x96 and 96x64 padded to 96x96: res3..res5 (strides 8-32) + one stride-64 level.
        self.assertEqual(encoded["spatial_shapes"], [(12, 12), (6, 6), (3, 3), (2, 2)])
        torch.testing.assert_close(
            encoded["valid_ratios"][:, :3],
            torch.tensor([[[1.0, 8 / 12], [1.0, 4 / 6], [1.0, 2 / 3]],
                          [[8 / 12, 1.0], [4 / 6, 1.0], [2 / 3, 1.0]]]),
        )  # fmt: skip
        mask = torch.zeros(1, 4, 6, dtype=torch.bool)
        mask[:, 3:, :] = True
        mask[:, :, 3:] = True
        ratio = valid_ratios(mask)
        torch.testing.assert_close(ratio, torch.tensor([[0.5, 0.75]]))
        refs = encoder_reference_points([(4, 6)], ratio[:, None])
        # Cell (row 1, col 2) centre, normalised by the valid size, mapped back to the map.
        torch.testing.assert_close(refs[0, 1 * 6 + 2, 0], torch.tensor([2.5 / 6, 1.5 / 4]))

    def test_output_shapes_and_references(self):
        for variant in VARIANTS:
            out = self.raw(variant)
            layers = out["layers"]
            self.assertEqual(tuple(layers["pred_logits"].shape), (2, 2, 10, 5))
            self.assertEqual(tuple(layers["reference_boxes"].shape), (2, 2, 10, 4))
            self.assertEqual(tuple(layers["query_content"].shape), (2, 10, 64))
            self.assertEqual("enc_outputs" in out, variant == "two_stage", variant)
        model = self.models["plain"]
        refs = self.raw("plain")["layers"]["reference_boxes"]
        pos = model.query_embed.weight[:, :64]
        with torch.no_grad():
            points = model.reference_points(pos).sigmoid()
        torch.testing.assert_close(refs[:, 0, :, :2], points.expand(2, -1, -1))
        # Point references report the w, h their layer predicts.
        boxes = self.raw("plain")["layers"]["pred_boxes"]
        torch.testing.assert_close(refs[..., 2:], boxes[..., 2:])

    def test_box_refinement_by_hand(self):
        model = self.models["refine"]
        layers = self.raw("refine")["layers"]
        with torch.no_grad():
            first = layers["pred_boxes"][0]  # layer 0 refines 2-d points into boxes
            torch.testing.assert_close(layers["reference_boxes"][1], first)
            ref = layers["reference_boxes"][1].clamp(1e-5, 1 - 1e-5)
            delta = model.bbox_embed[1](layers["hidden_states"][1])
            expected = (delta + torch.logit(ref)).sigmoid()
            torch.testing.assert_close(layers["pred_boxes"][1], expected)

    def test_two_stage_query_selection(self):
        model = self.models["two_stage"]
        out = self.raw("two_stage")
        enc = out["enc_outputs"]
        self.assertEqual(tuple(enc["pred_logits"].shape), (2, 144 + 36 + 9 + 4, 5))
        top = enc["pred_logits"][..., 0].topk(10, dim=1).indices
        expected = enc["pred_boxes"].gather(1, top[..., None].expand(-1, -1, 4))
        torch.testing.assert_close(out["layers"]["reference_boxes"][0], expected)
        with torch.no_grad():
            pos, content = model.proposal_query(expected)
        torch.testing.assert_close(out["layers"]["query_content"], content)
        # A group at the detection boxes without content is decoded exactly like the proposals.
        for decoding in ("separate", "masked"):
            same = self.raw("two_stage", [{"boxes": expected}], decoding)
            for key in ("pred_logits", "pred_boxes", "reference_boxes"):
                torch.testing.assert_close(same["groups"][0][key], out["layers"][key])

    def test_groups_do_not_change_detections(self):
        for variant in VARIANTS:
            model = self.models[variant]
            plain = self.raw(variant)
            for decoding in ("separate", "masked"):
                with_groups = self.raw(variant, groups_for(), decoding)
                msg = f"{variant}, {decoding}"
                for key in ("pred_logits", "pred_boxes", "reference_boxes"):
                    torch.testing.assert_close(
                        with_groups["layers"][key], plain["layers"][key], msg=msg
                    )
                with torch.no_grad():
                    a = model.losses(plain, self.targets)
                    b = model.losses(with_groups, self.targets)
                self.assertEqual(a.keys(), b.keys())
                for key in a:
                    torch.testing.assert_close(a[key], b[key], msg=f"{msg}: {key}")

    def test_groups_do_not_leak_and_use_their_boxes(self):
        g0, g1 = groups_for()
        for variant in VARIANTS:
            other = copy.deepcopy(self.models[variant])
            if variant != "two_stage":
                with torch.no_grad():
                    other.query_embed.weight.normal_()  # different detection queries
            for decoding in ("separate", "masked"):
                alone = self.raw(variant, [g1], decoding)["groups"][0]
                together = self.raw(variant, [g0, g1], decoding)["groups"]
                other_dets = self.raw(variant, [g1], decoding, model=other)["groups"][0]
                for key in ("pred_logits", "pred_boxes", "reference_boxes"):
                    msg = f"{variant}, {decoding}: {key}"
                    torch.testing.assert_close(together[1][key], alone[key], msg=msg)
                    torch.testing.assert_close(other_dets[key], alone[key], msg=msg)
                refs = together[0]["reference_boxes"]
                # The group's boxes are its layer-0 references; without refinement, every layer's.
                torch.testing.assert_close(refs[0], g0["boxes"].expand(2, -1, -1))
                if variant == "plain":
                    torch.testing.assert_close(refs[1], refs[0])
                else:
                    self.assertGreater((refs[1] - refs[0]).abs().max().item(), 1e-3)

    def test_group_content_defaults(self):
        boxes = groups_for()[0]["boxes"]
        for variant in ("plain", "two_stage"):
            model = self.models[variant]
            shared = self.raw(variant, [{"boxes": boxes}])["groups"][0]
            per_image = self.raw(variant, [{"boxes": boxes.expand(2, -1, -1).clone()}])
            torch.testing.assert_close(per_image["groups"][0]["pred_logits"], shared["pred_logits"])
            if variant == "plain":
                default = torch.zeros(1, 6, 64)
            else:
                with torch.no_grad():
                    default = model.proposal_query(boxes)[1]
            given = self.raw(variant, [{"boxes": boxes, "content": default}])["groups"][0]
            torch.testing.assert_close(given["pred_logits"], shared["pred_logits"])

    def test_invalid_groups_and_configs(self):
        for group in (
            {"pos": torch.zeros(1, 3, 64)},
            {"boxes": torch.zeros(3, 4)},
            {"boxes": torch.rand(1, 3, 4), "content": torch.zeros(1, 2, 64)},
        ):
            with self.assertRaises(ValueError):
                self.raw("plain", [group])
        with self.assertRaisesRegex(ValueError, "IN_FEATURES"):
            build_model(tiny_cfg("MODEL.DETR.DEFORMABLE.IN_FEATURES", "['res2']"))
        with self.assertRaisesRegex(ValueError, "USE_FOCAL_LOSS"):
            build_model(tiny_cfg("MODEL.DETR.USE_FOCAL_LOSS", "False"))
        with self.assertRaisesRegex(ValueError, "needs 10 proposals"):
            model = self.models["two_stage"]
            with torch.no_grad():
                model.forward_raw((torch.zeros(1, 3, 16, 16), torch.zeros(1, 16, 16).bool()))

    def test_inference_topk(self):
        model = self.models["two_stage"]
        with torch.no_grad():
            results = model(self.batch)
            raw = model.forward_raw(self.images)
        for i, result in enumerate(results):
            inst = result["instances"]
            self.assertEqual(inst.image_size, (self.batch[i]["height"], self.batch[i]["width"]))
            self.assertEqual(len(inst), 20)  # TEST_TOPK over queries x classes
            top = raw["pred_logits"][i].sigmoid().flatten().topk(20).values
            torch.testing.assert_close(inst.scores, top)

    def test_two_stage_encoder_loss_is_class_agnostic(self):
        model = self.models["two_stage"]
        out = self.raw("two_stage")
        with torch.no_grad():
            losses = model.losses(out, self.targets)
        agnostic = [dict(t, labels=torch.zeros_like(t["labels"])) for t in self.targets]
        crit = model.criterion
        indices = crit.matcher(out["enc_outputs"], agnostic)
        expected = crit.layer_losses(out["enc_outputs"], agnostic, indices, 3.0)
        for key in ("loss_class", "loss_bbox", "loss_giou"):
            torch.testing.assert_close(losses[f"{key}_enc"], expected[key] * crit.weight_dict[key])
        self.assertIn("loss_giou_0", losses)

    def test_gradients_reach_every_trainable_parameter(self):
        for variant in ("plain", "two_stage"):
            model = tiny_model(variant).train()
            losses = model(self.batch)
            self.assertTrue(all(k.startswith("loss_") for k in losses))
            sum(losses.values()).backward()
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            self.assertEqual([n for n, p in trainable.items() if p.grad is None], [], variant)
            zero = {n for n, p in trainable.items() if not p.grad.abs().sum() > 0}
            # box_pos_head only serves extra groups (a zero term keeps it in the graph for DDP).
            expected = {n for n in trainable if n.startswith("box_pos_head.")}
            self.assertEqual(zero, expected, variant)
            if variant == "plain":  # with groups, it is trained
                model.zero_grad()
                _, outputs = model(self.batch, extra_query_groups=groups_for())
                group_loss = sum(g["pred_boxes"].sum() for g in outputs["groups"])
                group_loss.backward()
                self.assertGreater(model.box_pos_head.layers[0].weight.grad.abs().sum(), 0)


class TestDeformableDETRConfigs(unittest.TestCase):
    def test_recipes(self):
        coco_images, batch = 117266, 32
        for name, refine, two_stage in [
            ("deformable_detr_R_50_50ep_coco.yaml", False, False),
            ("deformable_detr_R_18_50ep_coco.yaml", False, False),
            ("deformable_detr_R_101_50ep_coco.yaml", False, False),
            ("deformable_detr_box_refine_R_50_50ep_coco.yaml", True, False),
            ("deformable_detr_two_stage_R_50_50ep_coco.yaml", True, True),
        ]:
            cfg = config_from(os.path.join(REPO_ROOT, "configs", "deformable_detr", name))
            d, f = cfg.MODEL.DETR, cfg.MODEL.DETR.DEFORMABLE
            with self.subTest(config=name):
                self.assertEqual(cfg.MODEL.META_ARCHITECTURE, "DeformableDETR")
                self.assertEqual((f.WITH_BOX_REFINE, f.TWO_STAGE), (refine, two_stage))
                self.assertEqual((d.NUM_QUERIES, d.ENC_LAYERS, d.DEC_LAYERS), (300, 6, 6))
                self.assertEqual((f.NUM_FEATURE_LEVELS, f.ENC_N_POINTS, f.DEC_N_POINTS), (4, 4, 4))
                self.assertEqual(cfg.SOLVER.IMS_PER_BATCH, batch)
                self.assertAlmostEqual(cfg.SOLVER.BASE_LR, 2e-4)
                self.assertEqual(cfg.SOLVER.BACKBONE_MULTIPLIER, 0.1)
                self.assertEqual(
                    sorted(cfg.SOLVER.LR_MULTIPLIERS),
                    ["reference_points:0.1", "sampling_offsets:0.1"],
                )
                # 50 epochs, lr drop after 40, both rounded up to whole iterations.
                self.assertEqual(cfg.SOLVER.MAX_ITER, math.ceil(50 * coco_images / batch))
                self.assertEqual(cfg.SOLVER.STEPS, (math.ceil(40 * coco_images / batch),))

    def test_lr_multipliers_hit_the_right_parameters(self):
        from kd_detr.engine.optimizer import param_groups

        cfg = tiny_cfg(
            "SOLVER.BASE_LR", "1.0", "SOLVER.BACKBONE_MULTIPLIER", "0.1",
            "SOLVER.LR_MULTIPLIERS", "['sampling_offsets:0.1', 'reference_points:0.1']",
        )  # fmt: skip
        model = build_model(cfg)
        lr_of = {}
        for group in param_groups(model, cfg):
            for p in group["params"]:
                lr_of[id(p)] = group["lr"]
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            slow = name.startswith("backbone.") or "sampling_offsets" in name
            slow = slow or name.startswith("reference_points.")
            self.assertAlmostEqual(lr_of[id(p)], 0.1 if slow else 1.0, msg=name)


if __name__ == "__main__":
    unittest.main()
