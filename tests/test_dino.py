# Copyright (c) kd_detr contributors.
"""DINO mechanisms on tiny CPU models (no reference implementation offline): the composed
attention mask (contrastive denoising + extra groups), isolation of matching queries from
denoising queries and groups, CDN targets and losses (against torchvision's focal loss), the
look-forward-twice gradient path, mixed query selection against a top-K computed here."""
import copy
import os
import unittest

import torch
from torch import nn
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from detectron2.modeling import build_model

from kd_detr.modeling.box_ops import box_cxcywh_to_xyxy
from kd_detr.modeling.meta_arch import DINO  # noqa: F401  (registers the model)
from kd_detr.modeling.transformer import MLP

from .common import REPO_ROOT
from .model_helpers import (
    config_from,
    perturb_box_heads,
    perturb_deformable_attention,
    single_thread_module,
)
from .test_dab_detr import synthetic_batch
from .test_deformable_detr import groups_for

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml")


setUpModule, tearDownModule = single_thread_module()


def tiny_cfg(*opts):
    return config_from(CONFIG, *opts)


def tiny_dino(*opts, seed=0):
    """Tiny DINO whose zero-initialised box head and attention weights are perturbed, so that
    boxes move and every gradient is non-zero."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(*opts))
    perturb_box_heads([model.bbox_embed, model.enc_bbox_embed])
    perturb_deformable_attention(model)
    return model


def expected_mask(dn, num_matching, extra_sizes):
    """(B, N, N) mask built slot by slot from the rules (True = blocked)."""
    num_dn = dn.num_queries
    sizes = [num_matching] + list(extra_sizes)
    kind = [("dn", i // dn.group_size) for i in range(num_dn)]
    for block, size in enumerate(sizes):
        kind += [("q", block)] * size
    n = len(kind)
    out = torch.ones(dn.valid.shape[0], n, n, dtype=torch.bool)
    for b in range(dn.valid.shape[0]):
        for i in range(n):
            for j in range(n):
                if j < num_dn and not dn.valid[b, j]:
                    continue  # padding slots are hidden from everyone
                same = kind[i] == kind[j]
                dn_sees_matching = kind[i][0] == "dn" and kind[j] == ("q", 0)
                out[b, i, j] = not (same or dn_sees_matching)
    return out


class TestDINO(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_dino().eval()
        cls.batch = synthetic_batch()  # 2 images with 2 and 1 objects
        cls.images = cls.model.preprocess_image(cls.batch)
        cls.targets = cls.model.prepare_targets(cls.batch, cls.images.image_sizes)
        gen = torch.Generator().manual_seed(0)
        cls.dn = cls.model.denoising(cls.targets, generator=gen)

    def raw(self, groups=None, denoising=None, decoding="masked", model=None):
        model = model or self.model
        model.group_decoding = decoding
        with torch.no_grad():
            return model.forward_raw(self.images, groups, denoising)

    def test_cdn_query_layout_and_targets(self):
        dn = self.dn
        # Budget 6 queries, at most 2 objects: 3 groups of [2 positives | 2 negatives].
        self.assertEqual((dn.num_groups, dn.group_size), (3, 4))
        for b, target in enumerate(self.targets):
            count = len(target["labels"])
            for g in range(dn.num_groups):
                pos = slice(g * 4, g * 4 + count)
                neg = slice(g * 4 + 2, g * 4 + 2 + count)
                for part, positive in ((pos, True), (neg, False)):
                    self.assertTrue(dn.valid[b, part].all())
                    self.assertEqual(dn.positive[b, part].tolist(), [positive] * count)
                    self.assertEqual(dn.target_labels[b, part].tolist(), target["labels"].tolist())
                    torch.testing.assert_close(dn.target_boxes[b, part], target["boxes"])
                # image 1 has one object: its second slot of each half is padding
                if count == 1:
                    self.assertFalse(dn.valid[b, g * 4 + 1] or dn.valid[b, g * 4 + 3])
            # negatives lie farther from their object than positives (corner noise in [1, 2)
            # vs [0, 1) half-sizes, lambda 1), measured as L1 between corner coordinates
            xyxy = box_cxcywh_to_xyxy(dn.boxes[b])
            gt = box_cxcywh_to_xyxy(dn.target_boxes[b])
            dist = (xyxy - gt).abs().amax(-1)
            half = dn.target_boxes[b, :, 2:].amax(-1) / 2
            pos = dn.positive[b]
            self.assertTrue((dist[pos] <= half[pos] + 1e-6).all())
        # Content: the (noised) label embedding of width d, no indicator channel.
        valid = dn.valid
        expected = self.model.denoising.label_enc(dn.noised_labels)[valid]
        torch.testing.assert_close(dn.content[valid], expected)
        self.assertTrue((dn.content[~valid] == 0).all())

    def test_negative_queries_move_by_one_to_two_half_sizes(self):
        # Many objects: check the corner-noise magnitude of negatives and positives.
        gen = torch.Generator().manual_seed(1)
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).repeat(50, 1)
        targets = [{"labels": torch.zeros(50, dtype=torch.long), "boxes": boxes}]
        dn = self.model.denoising(targets, generator=gen)
        moved = (box_cxcywh_to_xyxy(dn.boxes[0]) - box_cxcywh_to_xyxy(boxes[:1])).abs()
        half = torch.tensor([0.1, 0.15, 0.1, 0.15])
        ratio = moved / half
        # (corners that crossed give a degenerate box clamped to the minimum size: skipped)
        kept = (dn.boxes[0, :, 2:] > 1e-3).all(-1)
        pos, neg = dn.positive[0] & kept, dn.valid[0] & ~dn.positive[0] & kept
        self.assertGreater(int(neg.sum()), 20)
        self.assertLess(ratio[pos].max().item(), 1.0 + 1e-5)
        self.assertGreaterEqual(ratio[neg].min().item(), 1.0 - 1e-5)
        self.assertLess(ratio[neg].max().item(), 2.0 + 1e-5)

    def test_attention_mask_composes_denoising_and_groups(self):
        calls = []
        decode = self.model.transformer.decode

        def spy(*args, **kwargs):
            calls.append(args[4] if len(args) > 4 else kwargs.get("self_attn_mask"))
            return decode(*args, **kwargs)

        self.model.transformer.decode = spy
        try:
            self.raw(groups_for(), self.dn, decoding="masked")
        finally:
            del self.model.transformer.decode
        self.assertEqual(len(calls), 1)  # one pass for everything
        expected = expected_mask(self.dn, 10, [6, 4])
        self.assertEqual(tuple(calls[0].shape), (2, 12 + 10 + 10, 12 + 10 + 10))
        self.assertTrue(torch.equal(calls[0], expected))

    def test_matching_outputs_ignore_denoising_queries_and_groups(self):
        plain = self.raw()
        other = copy.copy(self.dn)
        gen = torch.Generator().manual_seed(5)
        other.content = torch.randn(self.dn.content.shape, generator=gen)
        other.boxes = torch.rand(self.dn.boxes.shape, generator=gen) * 0.8 + 0.1
        for decoding in ("masked", "separate"):
            outs = [
                self.raw(groups_for(), dn, decoding) for dn in (self.dn, other)
            ] + [self.raw(groups_for(), None, decoding)]
            for out in outs:
                for key in ("pred_logits", "pred_boxes", "reference_boxes"):
                    torch.testing.assert_close(out["layers"][key], plain["layers"][key])
                    for g in (0, 1):
                        torch.testing.assert_close(
                            out["groups"][g][key], outs[-1]["groups"][g][key]
                        )
            # the denoising outputs do depend on the denoising queries
            diff = outs[0]["denoising"]["pred_boxes"] - outs[1]["denoising"]["pred_boxes"]
            self.assertGreater(diff.abs().max().item(), 1e-3)
        # a group's outputs do not depend on the other group or on the detection queries
        changed = copy.deepcopy(self.model)
        with torch.no_grad():
            changed.tgt_embed.weight.normal_()
        g0, g1 = groups_for()
        alone = self.raw([g1], self.dn, model=changed)["groups"][0]
        together = self.raw([g0, g1], self.dn)["groups"][1]
        for key in ("pred_logits", "pred_boxes", "reference_boxes"):
            torch.testing.assert_close(alone[key], together[key])
        torch.testing.assert_close(together["reference_boxes"][0], g1["boxes"])

    def test_denoising_losses_by_hand(self):
        model = self.model
        out = self.raw(None, self.dn)
        dn_out = out["denoising"]
        model.train()
        try:
            losses = model.losses(out, self.targets)
        finally:
            model.eval()
        weights = model.criterion.weight_dict
        dn = self.dn
        num_boxes = 3.0  # objects in the batch
        norm = num_boxes * dn.num_groups
        for layer, suffix in ((0, "_0"), (1, "")):
            logits = dn_out["pred_logits"][layer]
            onehot = torch.zeros_like(logits)
            for b, s in dn.positive.nonzero().tolist():
                onehot[b, s, dn.target_labels[b, s]] = 1  # negatives stay all-zero: no object
            focal = sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="none")
            expected_cls = focal[dn.valid].sum() / norm
            pred = dn_out["pred_boxes"][layer][dn.positive]
            tgt = dn.target_boxes[dn.positive]
            giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)).diag()
            expected = {
                "loss_class": expected_cls,
                "loss_bbox": (pred - tgt).abs().sum() / norm,
                "loss_giou": (1 - giou).sum() / norm,
            }
            for key, value in expected.items():
                name = f"{key}_dn{suffix}"
                torch.testing.assert_close(losses[name], value * weights[name], msg=name)
        self.assertEqual(weights["loss_class_dn"], weights["loss_class"])
        for key in ("loss_class_enc", "loss_bbox_enc", "loss_giou_enc"):
            self.assertIn(key, losses)

    def test_mixed_query_selection_takes_topk_proposals(self):
        model = self.model
        out = self.raw()
        encoded = out["encoder"]
        with torch.no_grad():
            logits = model.enc_class_embed(encoded["proposal_features"])
            coords = model.enc_bbox_embed(encoded["proposal_features"])
            coords = (coords + encoded["proposal_logits"]).sigmoid()
        for b in range(2):
            best = logits[b].max(-1).values
            order = sorted(range(len(best)), key=lambda i: -best[i].item())[:10]
            torch.testing.assert_close(
                out["layers"]["reference_boxes"][0, b], coords[b, order], msg=f"image {b}"
            )
            torch.testing.assert_close(out["enc_outputs"]["pred_logits"][b], logits[b, order])
        refs = out["layers"]["reference_boxes"]
        torch.testing.assert_close(out["enc_outputs"]["pred_boxes"], refs[0])
        # Content queries are the learned embeddings, not encoder features (mixed selection).
        torch.testing.assert_close(
            out["layers"]["query_content"], model.tgt_embed.weight.expand(2, -1, -1)
        )
        # Pure query selection (LEARNED_CONTENT False) takes the selected features instead.
        pure = tiny_dino("MODEL.DETR.DINO.LEARNED_CONTENT", "False").eval()
        self.assertFalse(hasattr(pure, "tgt_embed"))
        with torch.no_grad():
            p_out = pure.forward_raw(self.images)
            feats = p_out["encoder"]["proposal_features"]
            scores = pure.enc_class_embed(feats).max(-1).values
        index = scores.topk(10, dim=1).indices
        expected = feats.gather(1, index[..., None].expand(-1, -1, 64))
        torch.testing.assert_close(p_out["layers"]["query_content"], expected)

    def test_look_forward_twice_gradient_path(self):
        for twice in (True, False):
            model = tiny_dino("MODEL.DETR.DINO.LOOK_FORWARD_TWICE", str(twice)).train()
            encoded = model.encode(self.images)
            (content, boxes), enc_outputs = model._detection_queries(encoded)
            # the selected proposals enter the decoder detached; their own loss keeps the graph
            self.assertFalse(boxes.requires_grad)
            self.assertTrue(enc_outputs["pred_boxes"].requires_grad)
            torch.manual_seed(0)
            heads = [MLP(64, 64, 4, 3) for _ in range(2)]  # separate heads per layer
            hs, refs = model.transformer.decode(content, boxes, encoded, heads)
            # layer 1's box prediction is built on layer 0's refined box
            pred = heads[1](hs[1]) + torch.logit(refs[1].clamp(1e-3, 1 - 1e-3))
            grads = torch.autograd.grad(
                pred.sigmoid().sum(), list(heads[0].parameters()), allow_unused=True
            )
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            self.assertEqual(reached, twice, f"look_forward_twice={twice}")
            # layer 1 itself only saw the detached reference: its output has no path to head 0
            grads = torch.autograd.grad(
                hs[1].sum(), list(heads[0].parameters()), allow_unused=True
            )
            self.assertTrue(all(g is None for g in grads))
            # ... and the reference values equal head 0's refinement of the initial boxes
            self.assertGreater((refs[1] - refs[0]).abs().max().item(), 1e-4)

    def test_inference_and_training_outputs(self):
        model = self.model
        with torch.no_grad():
            results = model(self.batch)
        self.assertEqual(len(results[0]["instances"]), 20)  # TEST_TOPK
        self.assertEqual(results[0]["instances"].image_size, (128, 192))  # original size
        model.train()
        try:
            losses = model(self.batch)
        finally:
            model.eval()
        expected = {f"loss_{k}{s}" for k in ("class", "bbox", "giou") for s in ("", "_0")}
        expected |= {f"loss_{k}_{s}" for k in ("class", "bbox", "giou") for s in ("enc", "dn")}
        expected |= {f"loss_{k}_dn_0" for k in ("class", "bbox", "giou")}
        self.assertEqual(set(losses), expected)
        self.assertTrue(all(torch.isfinite(v) for v in losses.values()))

    def test_clear_errors(self):
        with self.assertRaisesRegex(TypeError, "DINOTransformer"):
            build_model(tiny_cfg("MODEL.DETR.TRANSFORMER_NAME", "DeformableTransformer"))
        model = tiny_dino("MODEL.DETR.NUM_QUERIES", "500").eval()
        with self.assertRaisesRegex(ValueError, "NUM_QUERIES"):
            with torch.no_grad():
                model.forward_raw(self.images)
        with self.assertRaisesRegex(ValueError, "'boxes' must be"):
            self.raw([{"boxes": torch.rand(2, 3)}])


class TestHeadsShared(unittest.TestCase):
    def test_parameters(self):
        model = tiny_dino()
        names = {n for n, _ in model.named_parameters()}
        for prefix in ("tgt_embed.", "enc_class_embed.", "enc_bbox_embed.", "class_embed.",
                       "denoising.label_enc.", "encoder_proposals.enc_output.",
                       "transformer.decoder.ref_point_head.", "transformer.decoder.norm."):
            self.assertTrue(any(n.startswith(prefix) for n in names), prefix)
        self.assertIsInstance(model.class_embed, nn.Linear)  # one head for every layer
        self.assertEqual(tuple(model.denoising.label_enc.weight.shape), (6, 64))
        self.assertFalse(any("proposal_query" in n or "box_pos_head" in n for n in names))


if __name__ == "__main__":
    unittest.main()
