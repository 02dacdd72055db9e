# Copyright (c) kd_detr contributors.
"""DABDETR: anchor refinement, training, inference and extra query groups (tiny CPU models)."""
import copy
import math
import os
import unittest

import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from kd_detr.modeling.meta_arch import DABDETR, block_diagonal_mask
from kd_detr.modeling.transformer.dab_transformer import box_sine_embedding

from .common import REPO_ROOT
from .model_helpers import config_from, perturb_box_heads

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")


def tiny_cfg(*opts):
    return config_from(CONFIG, *opts)


def tiny_model(*opts, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(*opts))
    heads = model.bbox_embed
    heads = heads if isinstance(heads, torch.nn.ModuleList) else [heads]
    perturb_box_heads(heads)  # move the zero-initialised box heads: every gradient is non-zero
    return model


def synthetic_batch():
    """Two images (64x96 and 96x64, pixels 0..255) with 2 and 1 boxes (xyxy pixels)."""
    gen = torch.Generator().manual_seed(0)
    batch = []
    for (h, w), boxes, classes in [
        ((64, 96), [[10, 8, 50, 40], [40, 20, 90, 60]], [1, 3]),
        ((96, 64), [[5, 30, 60, 90]], [0]),
    ]:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.gt_classes = torch.tensor(classes)
        image = torch.rand(3, h, w, generator=gen) * 255
        batch.append({"image": image, "instances": instances, "height": 2 * h, "width": 2 * w})
    return batch


def groups_for(batch_size: int = 2):
    gen = torch.Generator().manual_seed(3)
    return [
        {"boxes": torch.rand(1, 6, 4, generator=gen) * 0.5 + 0.25},
        {
            "boxes": torch.rand(batch_size, 4, 4, generator=gen) * 0.5 + 0.25,
            "content": torch.randn(batch_size, 4, 64, generator=gen),
        },
    ]


class TestDABDETR(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_model().eval()
        cls.batch = synthetic_batch()
        cls.images = cls.model.preprocess_image(cls.batch)

    def raw(self, groups=None, model=None, decoding="separate"):
        model = model or self.model
        model.group_decoding = decoding
        with torch.no_grad():
            return model.forward_raw(self.images, groups)

    def test_box_sine_embedding_order(self):
        boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
        emb = box_sine_embedding(boxes, num_feats=8)
        single = [box_sine_embedding(boxes[:, [i, i]], 8)[:, :8] for i in range(4)]
        torch.testing.assert_close(emb, torch.cat([single[1], single[0], single[2], single[3]], 1))
        self.assertAlmostEqual(emb[0, 0].item(), math.sin(0.2 * 2 * math.pi), 5)  # y first
        self.assertAlmostEqual(emb[0, 8].item(), math.sin(0.1 * 2 * math.pi), 5)

    def test_anchor_refinement_by_hand(self):
        captured = []
        hook = self.model.transformer.decoder.layers[0].register_forward_hook(
            lambda module, args, output: captured.append(output)
        )
        try:
            out = self.raw()
        finally:
            hook.remove()
        layers = out["layers"]
        anchors = self.model.refpoint_embed.weight.sigmoid()
        torch.testing.assert_close(layers["reference_boxes"][0], anchors.expand(2, -1, -1))
        with torch.no_grad():
            delta = self.model.bbox_embed(captured[0])  # un-normalised layer-0 output
            logit = torch.logit(anchors.clamp(1e-5, 1 - 1e-5))
            torch.testing.assert_close(layers["reference_boxes"][1], (delta + logit).sigmoid())
            for i in range(2):
                ref = layers["reference_boxes"][i].clamp(1e-5, 1 - 1e-5)
                expected = (self.model.bbox_embed(layers["hidden_states"][i]) + torch.logit(ref))
                torch.testing.assert_close(layers["pred_boxes"][i], expected.sigmoid())

    def test_gradients_reach_every_trainable_parameter(self):
        model = tiny_model().train()
        losses = model(self.batch)
        self.assertTrue(all(k.startswith("loss_") for k in losses))
        self.assertIn("loss_giou_0", losses)
        sum(losses.values()).backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.assertEqual([n for n, p in trainable.items() if p.grad is None], [])
        # The first layer's content queries are zeros, so these weights have zero gradient.
        zero_input = {
            f"transformer.decoder.layers.0.{name}.weight"
            for name in ("sa_qcontent_proj", "sa_kcontent_proj", "sa_v_proj")
        }
        zero = {n for n, p in trainable.items() if not p.grad.abs().sum() > 0}
        self.assertEqual(zero, zero_input)

    def test_inference_in_original_coordinates(self):
        with torch.no_grad():
            results = self.model(self.batch)
            raw = self.model.forward_raw(self.images)
        for i, result in enumerate(results):
            inst = result["instances"]
            h, w = self.batch[i]["height"], self.batch[i]["width"]
            self.assertEqual(inst.image_size, (h, w))
            self.assertEqual(len(inst), 20)  # TEST_TOPK over queries x classes
            boxes = inst.pred_boxes.tensor
            self.assertTrue((boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all())
            self.assertTrue((boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all())
            top = raw["pred_logits"][i].sigmoid().flatten().topk(20).values
            torch.testing.assert_close(inst.scores, top)
            query = raw["pred_logits"][i].sigmoid().flatten().topk(1).indices.item() // 5
            cx, cy, bw, bh = raw["pred_boxes"][i, query].tolist()
            expected = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            expected = [min(max(v, 0), s) for v, s in zip(expected, [w, h, w, h])]
            torch.testing.assert_close(boxes[0], torch.tensor(expected), atol=1e-3, rtol=0)

    def test_group_shapes_and_anchors(self):
        groups = groups_for()
        out = self.raw(groups)
        self.assertEqual(len(out["groups"]), 2)
        for group, size in zip(out["groups"], (6, 4)):
            self.assertEqual(tuple(group["pred_logits"].shape), (2, 2, size, 5))
            self.assertEqual(tuple(group["pred_boxes"].shape), (2, 2, size, 4))
            self.assertEqual(tuple(group["hidden_states"].shape), (2, 2, size, 64))
        torch.testing.assert_close(
            out["groups"][0]["reference_boxes"][0], groups[0]["boxes"].expand(2, -1, -1)
        )

    def test_groups_do_not_change_detections(self):
        targets = self.model.prepare_targets(self.batch, self.images.image_sizes)
        plain = self.raw()
        for decoding in ("separate", "masked"):
            with_groups = self.raw(groups_for(), decoding=decoding)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(with_groups["layers"][key], plain["layers"][key])
            with torch.no_grad():
                a, b = self.model.losses(plain, targets), self.model.losses(with_groups, targets)
            self.assertEqual(a.keys(), b.keys())
            for key in a:
                torch.testing.assert_close(a[key], b[key], msg=f"{decoding}: {key}")

    def test_groups_do_not_leak(self):
        g0, g1 = groups_for()
        other = copy.deepcopy(self.model)
        with torch.no_grad():
            other.refpoint_embed.weight.normal_()  # different detection queries
        for decoding in ("separate", "masked"):
            alone = self.raw([g1], decoding=decoding)["groups"][0]
            together = self.raw([g0, g1], decoding=decoding)["groups"][1]
            other_dets = self.raw([g1], model=other, decoding=decoding)["groups"][0]
            for key in ("pred_logits", "pred_boxes", "reference_boxes"):
                torch.testing.assert_close(together[key], alone[key], msg=f"{decoding}: {key}")
                torch.testing.assert_close(other_dets[key], alone[key], msg=f"{decoding}: {key}")

    def test_content_optional_and_shared_groups(self):
        boxes = groups_for()[0]["boxes"]  # (1, 6, 4), shared by both images
        shared = self.raw([{"boxes": boxes}])["groups"][0]
        per_image = self.raw([{"boxes": boxes.expand(2, -1, -1).clone()}])["groups"][0]
        zeros = self.raw([{"boxes": boxes, "content": torch.zeros(1, 6, 64)}])["groups"][0]
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(per_image[key], shared[key])
            torch.testing.assert_close(zeros[key], shared[key])
        # A group with the detection anchors and zero content reproduces the detections.
        anchors = self.model.refpoint_embed.weight.sigmoid()[None]
        out = self.raw([{"boxes": anchors}])
        torch.testing.assert_close(out["groups"][0]["pred_logits"], out["layers"]["pred_logits"])

    def test_invalid_groups(self):
        for group in (
            {"pos": torch.zeros(1, 3, 64)},
            {"boxes": torch.zeros(3, 4)},
            {"boxes": torch.rand(1, 3, 4), "content": torch.zeros(1, 2, 64)},
            {"boxes": torch.rand(1, 3, 4), "pos": torch.zeros(1, 3, 64)},
        ):
            with self.assertRaises(ValueError):
                self.raw([group])

    def test_block_diagonal_mask(self):
        mask = block_diagonal_mask([2, 1])
        expected = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
        self.assertTrue(torch.equal(mask, expected))

    def test_variants(self):
        variant = {
            "MODEL.DETR.DAB.NUM_PATTERNS": "2",
            "MODEL.DETR.DAB.BBOX_EMBED_DIFF_EACH_LAYER": "True",
            "MODEL.DETR.DAB.KEEP_QUERY_POS": "True",
            "MODEL.DETR.DAB.MODULATE_HW_ATTN": "False",
            "MODEL.DETR.DAB.RANDOM_REFPOINTS_XY": "True",
        }
        model = tiny_model(*[x for item in variant.items() for x in item]).eval()
        self.assertIsInstance(model, DABDETR)
        with torch.no_grad():
            out = model.forward_raw(self.images, [{"boxes": torch.rand(1, 3, 4)}])
        self.assertEqual(tuple(out["pred_logits"].shape), (2, 20, 5))
        self.assertEqual(tuple(out["groups"][0]["pred_boxes"].shape), (2, 2, 3, 4))
        with self.assertRaises(ValueError):
            build_model(tiny_cfg("MODEL.DETR.USE_FOCAL_LOSS", "False"))

    def test_training_lowers_the_loss(self):
        model = tiny_model("MODEL.BACKBONE.FREEZE_AT", "5", seed=1).train()  # transformer only
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        totals = []
        for _ in range(10):
            loss = sum(model(self.batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals.append(loss.item())
        self.assertLess(totals[-1], 0.8 * totals[0], totals)


class TestDABDETRConfigs(unittest.TestCase):
    def test_recipe_configs_build(self):
        coco_train_images, batch = 117266, 16
        for depth in (18, 50, 101):
            name = f"dab_detr_R_{depth}_50ep_coco.yaml"
            path = os.path.join(REPO_ROOT, "configs", "dab_detr", name)
            cfg = config_from(path, "MODEL.DEVICE", "cpu")
            self.assertEqual(cfg.SOLVER.MAX_ITER, math.ceil(50 * coco_train_images / batch))
            self.assertEqual(tuple(cfg.SOLVER.STEPS), (40 * coco_train_images // batch,))
            model = build_model(cfg)
            self.assertIsInstance(model, DABDETR)
            self.assertEqual(model.refpoint_embed.weight.shape, (300, 4))
            self.assertEqual(model.class_embed.out_features, 80)
            self.assertEqual(model.test_topk, 300)
            self.assertEqual(cfg.SOLVER.OPTIMIZER, "ADAMW")
            self.assertEqual(cfg.SOLVER.BACKBONE_MULTIPLIER, 0.1)
            self.assertEqual(cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, "full_model")


if __name__ == "__main__":
    unittest.main()
