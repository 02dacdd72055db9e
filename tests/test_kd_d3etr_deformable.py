# Copyright (c) kd_detr contributors.
"""D3ETR's attention maps on deformable decoders (Deformable DETR, DINO): the cross-attention
map (sampling weights scattered bilinearly onto the multi-scale token grid) against a hand
computation and against the sampling kernel itself in float64 (one-hot values), with samples
outside the grid and padding; outputs bit-identical with and without the maps (separate,
masked and checkpointed group decoding, DINO's denoising queries left out); KD steps of D3ETR
with the attention terms; the start-up error on RT-DETR / D-FINE, whose decoders have none."""
import math
import os
import tempfile
import unittest

import torch

from kd_detr.modeling.transformer.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_core_pytorch,
    sampling_attention_map,
)

from .kd_helpers import kd_student_cfg, run_kd_step, save_teacher, synthetic_batch
from .kd_query_helpers import assert_same_outputs
from .model_helpers import single_thread_module
from .test_kd_d3etr_attention import TESTS, attention_term, box_groups, run, tiny_model

setUpModule, tearDownModule = single_thread_module()

DEFORMABLE_TINY = os.path.join(TESTS, "deformable_detr_tiny_parity.yaml")
DINO_TINY = os.path.join(TESTS, "dino_tiny.yaml")
SHAPES = [(2, 3), (1, 2)]  # two levels: tokens 0-5 (row-major 2 x 3), then 6-7 (1 x 2)


def one_hot_map(shapes, locations, weights):
    """The map read off the sampling kernel itself: with value[b, s, h, :] the one-hot vector of
    token s, the kernel's output channel s of head h is the weight that reaches token s."""
    bsz, num_q, heads = weights.shape[:3]
    tokens = sum(h * w for h, w in shapes)
    value = torch.eye(tokens, dtype=weights.dtype)[None, :, None].expand(bsz, -1, heads, -1)
    out = ms_deform_attn_core_pytorch(value, shapes, locations, weights)
    return out.view(bsz, num_q, heads, tokens).transpose(1, 2)


class TestSamplingMap(unittest.TestCase):
    def test_hand_case(self):
        """One query, one head, two levels of two points each (float64)."""
        locations = torch.tensor(
            [
                [[0.5, 0.5], [0.0, 0.25]],  # level 0: between tokens 1 and 4; half outside
                [[0.5, 0.5], [1.5, 0.5]],  # level 1: between tokens 6 and 7; all outside
            ],
            dtype=torch.float64,
        ).view(1, 1, 1, 2, 2, 2)
        weights = torch.tensor([[0.4, 0.1], [0.3, 0.2]], dtype=torch.float64).view(1, 1, 1, 2, 2)
        got = sampling_attention_map(SHAPES, locations, weights)
        # level 0 (w 3, h 2): (0.5, 0.5) -> cell (u, v) = (1.0, 0.5): tokens (0, 1) and (1, 1),
        # 1/2 each of 0.4; (0.0, 0.25) -> (-0.5, 0.0): half on column -1 (dropped), half on
        # token 0 (0.05). Level 1 (w 2, h 1): (0.5, 0.5) -> (0.5, 0.0): tokens 6 and 7 half each
        # of 0.3; (1.5, 0.5) -> (2.5, 0.0): columns 2 and 3, outside (0.2 dropped).
        expected = torch.tensor([0.05, 0.2, 0, 0, 0.2, 0, 0.15, 0.15], dtype=torch.float64)
        self.assertEqual(tuple(got.shape), (1, 1, 1, 8))
        torch.testing.assert_close(got[0, 0, 0], expected, atol=1e-15, rtol=0)
        self.assertAlmostEqual(got.sum().item(), 1.0 - 0.05 - 0.2, places=12)
        torch.testing.assert_close(got, one_hot_map(SHAPES, locations, weights))
        padding = torch.zeros(1, 8, dtype=torch.bool)
        padding[0, 4] = True
        masked = sampling_attention_map(SHAPES, locations, weights, padding)
        torch.testing.assert_close(masked[0, 0, 0], expected.masked_fill(padding[0], 0.0))

    def test_random_against_the_kernel(self):
        gen = torch.Generator().manual_seed(0)
        shapes = [(5, 4), (3, 2), (1, 1)]
        bsz, num_q, heads, points = 2, 5, 3, 4
        locations = torch.rand(bsz, num_q, heads, 3, points, 2, generator=gen,
                               dtype=torch.float64) * 1.6 - 0.3  # fmt: skip
        weights = torch.randn(bsz, num_q, heads, 3 * points, generator=gen, dtype=torch.float64)
        weights = weights.softmax(-1).view(bsz, num_q, heads, 3, points)
        got = sampling_attention_map(shapes, locations, weights)
        torch.testing.assert_close(got, one_hot_map(shapes, locations, weights))
        sums = got.sum(-1)
        self.assertTrue((sums <= 1 + 1e-12).all() and (sums < 1 - 1e-3).any())  # some outside
        # inside the grid (at least half a cell from the border) every row sums to 1
        inside = torch.rand(bsz, num_q, heads, 3, points, 2, generator=gen, dtype=torch.float64)
        size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None]
        inside = (0.5 + inside * (size - 1)) / size
        torch.testing.assert_close(sampling_attention_map(shapes, inside, weights).sum(-1),
                                   torch.ones(bsz, heads, num_q, dtype=torch.float64))  # fmt: skip

    def test_gradients(self):
        gen = torch.Generator().manual_seed(1)
        locations = (torch.rand(1, 2, 1, 2, 2, 2, generator=gen, dtype=torch.float64) * 0.8
                     + 0.1).requires_grad_()  # fmt: skip
        weights = torch.rand(1, 2, 1, 2, 2, generator=gen, dtype=torch.float64).requires_grad_()
        self.assertTrue(torch.autograd.gradcheck(
            lambda loc, w: sampling_attention_map(SHAPES, loc, w), (locations, weights)
        ))  # fmt: skip

    def test_module_map_and_unchanged_output(self):
        """MSDeformAttn with ``need_weights``: the same output bit for bit, and the map the
        kernel reads (identity projections, one-hot values per head), for point and box
        references and padding."""
        heads, tokens = 2, 8
        d = heads * tokens
        attn = MSDeformAttn(d, n_levels=2, n_heads=heads, n_points=3, kernel="pytorch").double()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for proj in (attn.sampling_offsets, attn.attention_weights):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.5)
        query = torch.randn(2, 4, d, generator=gen, dtype=torch.float64)
        padding = torch.zeros(2, tokens, dtype=torch.bool)
        padding[1, 5:] = True
        for ref_dim in (2, 4):
            with self.subTest(reference=ref_dim):
                reference = torch.rand(2, 4, 2, ref_dim, generator=gen, dtype=torch.float64)
                memory = torch.randn(2, tokens, d, generator=gen, dtype=torch.float64)
                plain = attn(query, reference, memory, SHAPES, padding)
                out, got = attn(query, reference, memory, SHAPES, padding, need_weights=True)
                self.assertTrue(torch.equal(plain, out))
                self.assertEqual(tuple(got.shape), (2, heads, 4, tokens))
                self.assertTrue((got.permute(0, 3, 1, 2)[padding] == 0).all())
                eye = torch.eye(d, dtype=torch.float64)
                one_hot = torch.eye(tokens, dtype=torch.float64).repeat(1, heads)[None]
                with torch.no_grad():
                    saved = [(p.weight.clone(), p.bias.clone())
                             for p in (attn.value_proj, attn.output_proj)]  # fmt: skip
                    for proj in (attn.value_proj, attn.output_proj):
                        proj.weight.copy_(eye)
                        proj.bias.zero_()
                    read = attn(query, reference, one_hot.expand(2, -1, -1), SHAPES, padding)
                    for proj, (w, b) in zip((attn.value_proj, attn.output_proj), saved):
                        proj.weight.copy_(w)
                        proj.bias.copy_(b)
                expected = read.view(2, 4, heads, tokens).transpose(1, 2)
                torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def mixed_batch():
    """Two images of different sizes: the second is padded."""
    return synthetic_batch(1) + synthetic_batch(1, size=48, seed=1)


class TestModelMaps(unittest.TestCase):
    CASES = [
        (DEFORMABLE_TINY, ()),
        (DEFORMABLE_TINY, ("MODEL.DETR.GROUP_DECODING", "masked")),
        (DEFORMABLE_TINY, ("MODEL.DETR.GROUP_CHECKPOINT", "True")),
        (DEFORMABLE_TINY, ("MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True",
                           "MODEL.DETR.DEFORMABLE.TWO_STAGE", "True",
                           "MODEL.DETR.GROUP_DECODING", "masked")),
        (DINO_TINY, ()), (DINO_TINY, ("MODEL.DETR.GROUP_DECODING", "masked")),
        (DINO_TINY, ("MODEL.DETR.GROUP_CHECKPOINT", "True")),
        (DINO_TINY, ("MODEL.DETR.DN.ENABLED", "False")),
    ]  # fmt: skip

    def test_outputs_unchanged_and_maps_shaped(self):
        data = mixed_batch()
        for config_file, opts in self.CASES:
            with self.subTest(config=os.path.basename(config_file), opts=opts):
                model = tiny_model(config_file, *opts).train()
                self.assertTrue(model.decoder_attention_maps)
                groups = box_groups(True)
                losses, plain = run(model, data, groups, False)
                kept_losses, kept = run(model, data, groups, True)
                assert_same_outputs(self, losses, plain, kept_losses, kept)
                if "denoising" in plain:
                    self.assertTrue(torch.equal(plain["denoising"]["pred_boxes"],
                                                kept["denoising"]["pred_boxes"]))  # fmt: skip
                maps = kept["attention_maps"]
                layers = model.transformer.num_decoder_layers
                encoder = kept["encoder"]
                tokens = sum(h * w for h, w in encoder["spatial_shapes"])
                self.assertEqual(tokens, encoder["memory"].shape[1])
                self.assertTrue(encoder["mask"][1].any())  # the second image is padded
                for part, n in zip([maps["layers"], *maps["groups"]], (6, 3, 4)):
                    self.assertEqual(tuple(part["self_attn"].shape), (layers, 2, 4, n, n))
                    self.assertEqual(tuple(part["cross_attn"].shape), (layers, 2, 4, n, tokens))
                    torch.testing.assert_close(part["self_attn"].sum(-1),
                                               torch.ones(layers, 2, 4, n))  # fmt: skip
                    cross = part["cross_attn"]
                    self.assertTrue((cross >= 0).all() and (cross.sum(-1) <= 1 + 1e-5).all())
                    self.assertGreater(cross.sum(-1).mean().item(), 0.1)
                    padding = encoder["mask"][None, :, None, None].expand_as(cross)
                    self.assertTrue((cross[padding] == 0).all())
                _, plain_again = run(model, data, groups, False)
                self.assertNotIn("attention_maps", plain_again)

    def test_group_maps_are_their_own(self):
        """A group's maps from a masked pass (with DINO's denoising queries in it) equal those
        of its own pass; checkpointed groups give the same maps and gradients."""
        data = mixed_batch()
        groups = box_groups(True)
        for config_file in (DEFORMABLE_TINY, DINO_TINY):
            with self.subTest(config=os.path.basename(config_file)):
                reference = tiny_model(config_file).train()
                model = tiny_model(config_file, "MODEL.DETR.GROUP_DECODING", "masked").train()
                model.load_state_dict(reference.state_dict())
                with torch.no_grad():
                    _, alone = run(reference, data, groups, True)
                    _, joint = run(model, data, groups, True)
                self.assertEqual("denoising" in joint, config_file == DINO_TINY)
                a, b = alone["attention_maps"], joint["attention_maps"]
                for x, y in zip([a["layers"], *a["groups"]], [b["layers"], *b["groups"]]):
                    for key in ("self_attn", "cross_attn"):
                        torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=1e-5)
                grads, maps = [], []
                for flag in ("False", "True"):
                    model = tiny_model(config_file, "MODEL.DETR.GROUP_CHECKPOINT", flag).train()
                    model.load_state_dict(reference.state_dict())
                    _, out = run(model, data, groups, True)
                    g = out["attention_maps"]["groups"]
                    maps.append(g)
                    loss = sum(m["self_attn"].pow(2).sum() + m["cross_attn"].pow(2).sum()
                               for m in g)  # fmt: skip
                    loss.backward()  # the recomputation runs with the flag already off
                    layer = model.transformer.decoder.layers[-1]
                    grads.append(layer.cross_attn.sampling_offsets.weight.grad)
                for x, y in zip(*maps):
                    for key in ("self_attn", "cross_attn"):
                        torch.testing.assert_close(x[key], y[key])
                self.assertGreater(grads[0].abs().sum().item(), 0)
                torch.testing.assert_close(grads[0], grads[1])


class TestKDSteps(unittest.TestCase):
    def test_d3etr_attention_step(self):
        for config_file in (DEFORMABLE_TINY, DINO_TINY):
            with self.subTest(config=os.path.basename(config_file)):
                with tempfile.TemporaryDirectory() as tmp:
                    weights = save_teacher(tmp, config_file=config_file)
                    cfg = kd_student_cfg(config_file, tmp, weights)
                    cfg.merge_from_list(
                        ["MODEL.KD.LOSSES", "['D3ETRLoss']", "MODEL.KD.GENERAL.ENABLED", "False"]
                    )
                    trainer, losses, _, s_calls = run_kd_step(cfg, config_file, [])
                self.assertEqual(trainer._trainer.kd_inputs,
                                 {"points", "detections", "attention"})  # fmt: skip
                for kind in ("adaptive", "fixed"):
                    for part in ("self_attn", "cross_attn"):
                        for suffix in ("", "_0"):
                            key = f"{kind}_{part}{suffix}"
                            value = losses[f"loss_kd_d3etr_{key}"]
                            self.assertTrue(math.isfinite(value), key)
                            # Untrained DINOs sample alike (the paper's initialisation: fixed
                            # offsets, uniform weights): layer 0 on the same boxes agrees.
                            if (config_file, key) != (DINO_TINY, "fixed_cross_attn_0"):
                                self.assertGreater(value, 0, key)
                self.assertEqual(len(s_calls[0]["kwargs"]["extra_query_groups"]), 1)
                self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))
                offsets = trainer.model.transformer.decoder.layers[0].cross_attn.sampling_offsets
                self.assertIsNotNone(offsets.weight.grad)
                self.assertFalse(trainer.teacher.model.keep_attention_maps)
                self.assertFalse(trainer._trainer.student.keep_attention_maps)


class TestModelsWithoutMaps(unittest.TestCase):
    def test_startup_error_on_rt_detr_and_dfine(self):
        deformable = tiny_model(DEFORMABLE_TINY)
        for name in ("rt_detr_tiny_parity.yaml", "dfine_tiny_parity.yaml"):
            model = tiny_model(os.path.join(TESTS, name))
            cls = type(model).__name__
            self.assertFalse(model.decoder_attention_maps)
            for student, teacher, role in ((deformable, model, "teacher"),
                                           (model, deformable, "student")):  # fmt: skip
                with self.assertRaisesRegex(
                    ValueError, f"D3ETRLoss.*{role} \\({cls}\\).*SELF_ATTN_WEIGHT 0.*"
                    "CROSS_ATTN_WEIGHT 0"
                ):
                    attention_term(fixed=False).bind(student, teacher)


if __name__ == "__main__":
    unittest.main()
