# Copyright (c) kd_detr contributors.
"""Multi-scale deformable attention: the grid_sample core against a per-point bilinear
reference written here, its gradients, the module's sampling locations and the kernel registry."""
import math
import unittest

import torch

from kd_detr.modeling.transformer import ms_deform_attn as msda
from kd_detr.modeling.transformer.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_core_pytorch,
    register_kernel,
    select_kernel,
)

SHAPES = [(3, 4), (2, 3)]


def bilinear(grid, x, y):
    """Sample ``grid`` (C, h, w) at normalised (x, y) as align_corners=False with zero padding:
    pixel centres sit at ((j + 0.5) / w, (i + 0.5) / h); outside cells read 0."""
    _, h, w = grid.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(grid.shape[0], dtype=grid.dtype)
    for j, i, weight in [
        (x0, y0, (x0 + 1 - px) * (y0 + 1 - py)),
        (x0 + 1, y0, (px - x0) * (y0 + 1 - py)),
        (x0, y0 + 1, (x0 + 1 - px) * (py - y0)),
        (x0 + 1, y0 + 1, (px - x0) * (py - y0)),
    ]:
        if 0 <= i < h and 0 <= j < w:
            out += weight * grid[:, i, j]
    return out


def reference_attention(value, shapes, locations, weights):
    """Direct loop over (b, q, head, level, point)."""
    bsz, _, heads, head_dim = value.shape
    num_q, points = locations.shape[1], locations.shape[4]
    out = torch.zeros(bsz, num_q, heads * head_dim, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(bsz):
        for q in range(num_q):
            for m in range(heads):
                acc = torch.zeros(head_dim, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes):
                    grid = value[b, starts[lvl] : starts[lvl + 1], m].T.reshape(head_dim, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        acc += weights[b, q, m, lvl, p] * bilinear(grid, x, y)
                out[b, q, m * head_dim : (m + 1) * head_dim] = acc
    return out


def random_inputs(dtype=torch.float32, bsz=2, num_q=3, heads=2, head_dim=3, points=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(bsz, total, heads, head_dim, generator=gen, dtype=dtype)
    # Locations partly outside [0, 1] exercise the zero padding.
    loc = torch.rand(bsz, num_q, heads, len(SHAPES), points, 2, generator=gen, dtype=dtype)
    loc = loc * 1.3 - 0.15
    weights = torch.rand(bsz, num_q, heads, len(SHAPES), points, generator=gen, dtype=dtype)
    return value, loc, weights


class TestCore(unittest.TestCase):
    def test_matches_per_point_bilinear_reference(self):
        value, loc, weights = random_inputs(torch.float64)
        self.assertTrue(((loc < 0) | (loc > 1)).any())
        expected = reference_attention(value, SHAPES, loc, weights)
        out = ms_deform_attn_core_pytorch(value, SHAPES, loc, weights)
        self.assertEqual(tuple(out.shape), (2, 3, 6))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    def test_cell_centre_reads_the_cell(self):
        value, loc, weights = random_inputs(torch.float64, bsz=1, num_q=1, heads=1, points=1)
        loc[..., 0, 0, 0], loc[..., 0, 0, 1] = (2 + 0.5) / 4, (1 + 0.5) / 3  # level 0, cell (1, 2)
        weights = torch.zeros_like(weights)
        weights[..., 0, 0] = 1.0
        out = ms_deform_attn_core_pytorch(value, SHAPES, loc, weights)
        torch.testing.assert_close(out[0, 0], value[0, 1 * 4 + 2, 0])

    def test_gradcheck(self):
        value, loc, weights = random_inputs(torch.float64, bsz=1, num_q=2, points=2, seed=1)
        inputs = tuple(t.clone().requires_grad_(True) for t in (value, loc, weights))
        self.assertTrue(
            torch.autograd.gradcheck(
                lambda v, l, w: ms_deform_attn_core_pytorch(v, SHAPES, l, w), inputs
            )
        )


class TestModule(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, kernel="pytorch")
        with torch.no_grad():
            self.attn.sampling_offsets.weight.normal_(std=0.5)
            self.attn.attention_weights.weight.normal_()
        self.query = torch.randn(2, 3, 8)
        self.value = torch.randn(2, sum(h * w for h, w in SHAPES), 8)
        self.captured = []
        register_kernel("capture", self._capture)
        self.attn.kernel = "capture"

    def tearDown(self):
        msda.MSDA_KERNELS.pop("capture", None)

    def _capture(self, value, shapes, locations, weights):
        self.captured.append((value, locations, weights))
        return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    def offsets(self):
        return self.attn.sampling_offsets(self.query).view(2, 3, 2, 2, 2, 2)

    def test_initial_offsets_form_rays(self):
        bias = MSDeformAttn(8, 2, 4, 3).sampling_offsets.bias.view(4, 2, 3, 2)
        # head 1 of 4 points along +y, point p at p + 1 cells, on every level
        torch.testing.assert_close(bias[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]))

    def test_point_and_box_sampling_locations(self):
        points = torch.rand(2, 3, 2, 2)
        self.attn(self.query, points, self.value, SHAPES)
        cells = torch.tensor([[1 / 4, 1 / 3], [1 / 3, 1 / 2]])  # 1 / (w, h) per level
        expected = points[:, :, None, :, None] + self.offsets() * cells[None, None, None, :, None]
        torch.testing.assert_close(self.captured[-1][1], expected)
        boxes = torch.rand(2, 3, 2, 4)
        self.attn(self.query, boxes, self.value, SHAPES)
        scale = boxes[:, :, None, :, None, 2:] / 2 / 2  # offset / n_points * (w, h) / 2
        expected = boxes[:, :, None, :, None, :2] + self.offsets() * scale
        torch.testing.assert_close(self.captured[-1][1], expected)
        # Rows flagged as points ignore their w, h and sample like 2-d references.
        mixed = torch.cat([points, torch.rand(2, 3, 2, 2)], -1)
        point_mask = torch.tensor([True, False, True])
        out = self.attn(self.query, mixed, self.value, SHAPES, point_mask=point_mask)
        as_points = self.attn(self.query, points, self.value, SHAPES)
        torch.testing.assert_close(out[:, point_mask], as_points[:, point_mask])
        self.assertFalse(torch.allclose(out[:, 1], as_points[:, 1]))
        # Softmax over levels x points.
        torch.testing.assert_close(self.captured[-1][2].sum((-1, -2)), torch.ones(2, 3, 2))

    def test_padding_is_zeroed(self):
        mask = torch.zeros(2, self.value.shape[1], dtype=torch.bool)
        mask[1, 5:12] = True
        refs = torch.rand(2, 3, 2, 2)
        self.attn(self.query, refs, self.value, SHAPES, padding_mask=mask)
        sampled_value = self.captured[-1][0]
        self.assertTrue((sampled_value[1, 5:12] == 0).all())
        torch.testing.assert_close(
            sampled_value[0], self.attn.value_proj(self.value[0]).view(-1, 2, 4)
        )

    def test_level_count_error(self):
        with self.assertRaisesRegex(ValueError, "2 levels but got 1 feature maps"):
            self.attn(self.query, torch.rand(2, 3, 1, 2), self.value[:, :12], SHAPES[:1])


class TestKernelRegistry(unittest.TestCase):
    def tearDown(self):
        msda.MSDA_KERNELS.pop("fake", None)

    def test_selection(self):
        value = torch.zeros(1, 2, 1, 1)
        self.assertIs(select_kernel("pytorch", value), ms_deform_attn_core_pytorch)
        with self.assertRaisesRegex(ValueError, "Unknown deformable-attention kernel 'nope'"):
            select_kernel("nope", value)
        register_kernel("fake", lambda *a: "fake", supports=lambda v: v.dtype == torch.float64)
        # "auto" takes a registered kernel that supports the tensors, else the PyTorch one.
        self.assertEqual(select_kernel("auto", value.double())(), "fake")
        self.assertIs(select_kernel("auto", value), ms_deform_attn_core_pytorch)
        with self.assertRaisesRegex(ValueError, "does not support cpu torch.float32"):
            select_kernel("fake", value)


if __name__ == "__main__":
    unittest.main()
