# Copyright (c) kd_detr contributors.
"""Multi-scale deformable attention (Zhu et al., ICLR 2021).

Every query reads ``n_points`` bilinearly sampled values per head and feature level around its
reference point and sums them with softmax-normalised weights (over levels x points). The
sampling itself is done by a *kernel*:

* ``"pytorch"``: :func:`ms_deform_attn_core_pytorch`, ``F.grid_sample`` (bilinear,
  ``align_corners=False``, zero padding); runs everywhere, differentiable by autograd.
* ``"cuda"``: the compiled ``MultiScaleDeformableAttention`` extension of the official
  Deformable-DETR code (``models/ops``), registered when it is importable; CUDA tensors only.

``kernel="auto"`` (``MODEL.DETR.DEFORMABLE.ATTN_KERNEL``) picks the first registered kernel other
than "pytorch" that supports the tensors, else "pytorch". :func:`register_kernel` adds others.
"""
import importlib
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MSDeformAttn",
    "MSDA_KERNELS",
    "ms_deform_attn",
    "ms_deform_attn_core_pytorch",
    "register_kernel",
    "sampling_attention_map",
    "select_kernel",
]

Shapes = Sequence[Tuple[int, int]]


def ms_deform_attn_core_pytorch(value, spatial_shapes: Shapes, sampling_locations, weights):
    """Weighted sum of bilinear samples of every level (the reference implementation).

    Args:
        value (Tensor): (B, S, H, Dh) values of all levels flattened, S = sum(h_l * w_l).
        spatial_shapes: L pairs (h_l, w_l).
        sampling_locations (Tensor): (B, Q, H, L, P, 2) (x, y) in [0, 1] of each level's
            (unpadded + padded) map; (0, 0) is the top-left corner of the top-left cell.
        weights (Tensor): (B, Q, H, L, P) attention weights.

    Returns:
        Tensor: (B, Q, H * Dh). Samples outside the map read zeros.
    """
    bsz, _, heads, head_dim = value.shape
    _, num_q, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample coordinates in [-1, 1]
    # (B, Q, H, L, P) -> (B*H, 1, Q, L, P)
    weights = weights.transpose(1, 2).reshape(bsz * heads, 1, num_q, levels, points)
    out = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        v = values[lvl].flatten(2).transpose(1, 2).reshape(bsz * heads, head_dim, h, w)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Weighted sum per level (B*H, Dh, Q, P) -> (B*H, Dh, Q), accumulated over levels: no
        # stacked (B*H, Dh, Q, L*P) copy (CPU: about 15% faster at encoder sizes).
        out = out + (sampled * weights[..., lvl, :]).sum(-1)
    return out.view(bsz, heads * head_dim, num_q).transpose(1, 2).contiguous()


def sampling_attention_map(spatial_shapes: Shapes, sampling_locations, weights, padding_mask=None):
    """The attention map of deformable attention over the flattened multi-scale tokens.

    Every sample is bilinear (``F.grid_sample``, ``align_corners=False``): a location (x, y) on
    level l reads the token grid at the continuous cell coordinate (u, v) = (x w_l - 1/2,
    y h_l - 1/2), i.e. the four tokens (floor(u) + i, floor(v) + j), i, j in {0, 1}, with
    bilinear factors (1 - |u - u_ij|)(1 - |v - v_ij|). The map puts the sample's attention
    weight times each factor on that token (index ``start_l + row * w_l + col`` in the order of
    :func:`ms_deform_attn_core_pytorch`'s ``value``) and adds up all samples of a query and
    head. Corners outside the level's grid are dropped (zero padding reads 0 there), as are
    tokens flagged in ``padding_mask`` (their values are zeroed), so a row sums to 1 less the
    weight that falls outside the grid or on padding. Differentiable in both the locations and
    the weights.

    Args:
        spatial_shapes: L pairs (h_l, w_l).
        sampling_locations (Tensor): (B, Q, H, L, P, 2) as :func:`ms_deform_attn_core_pytorch`.
        weights (Tensor): (B, Q, H, L, P) attention weights.
        padding_mask (Tensor): optional (B, S) bool, True on padding tokens (set to 0).

    Returns:
        Tensor: (B, H, Q, S) in the dtype of ``weights``, S = sum(h_l * w_l).
    """
    bsz, num_q, heads, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    flat = weights.new_zeros(bsz, heads, num_q, sum(sizes))
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        h, w = int(h), int(w)
        # (B, Q, H, P, 2) -> (B, H, Q, P, 2): continuous cell coordinates of every sample
        loc = sampling_locations[:, :, :, lvl].transpose(1, 2).to(weights.dtype)
        u = loc[..., 0] * w - 0.5
        v = loc[..., 1] * h - 0.5
        u0, v0 = u.floor(), v.floor()
        fu, fv = u - u0, v - v0
        weight = weights[:, :, :, lvl].transpose(1, 2)  # (B, H, Q, P)
        for du, dv, factor in (
            (0, 0, (1 - fu) * (1 - fv)),
            (1, 0, fu * (1 - fv)),
            (0, 1, (1 - fu) * fv),
            (1, 1, fu * fv),
        ):
            col, row = (u0 + du).long(), (v0 + dv).long()
            inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
            index = start + (row.clamp(0, h - 1) * w + col.clamp(0, w - 1))
            src = torch.where(inside, weight * factor, torch.zeros_like(weight))
            flat = flat.scatter_add(-1, index, src)
        start += h * w
    if padding_mask is not None:
        flat = flat.masked_fill(padding_mask[:, None, None], 0.0)
    return flat


class _Kernel:
    """A registered sampling kernel: ``fn(value, spatial_shapes, sampling_locations, weights)``
    as :func:`ms_deform_attn_core_pytorch`, and ``supports(value) -> bool``."""

    def __init__(self, fn: Callable, supports: Callable[[torch.Tensor], bool]):
        self.fn = fn
        self.supports = supports


MSDA_KERNELS: Dict[str, _Kernel] = {}


def register_kernel(name: str, fn: Callable, supports: Callable = lambda value: True) -> None:
    """Register (or replace) kernel ``name``; see :class:`_Kernel` for the signatures."""
    MSDA_KERNELS[name] = _Kernel(fn, supports)


register_kernel("pytorch", ms_deform_attn_core_pytorch)


def _official_cuda_kernel():
    """The official compiled op wrapped in an autograd Function, or None when not installed."""
    try:
        ext = importlib.import_module("MultiScaleDeformableAttention")
    except ImportError:
        return None

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, start, locations, weights, im2col_step):
            ctx.im2col_step = im2col_step
            out = ext.ms_deform_attn_forward(value, shapes, start, locations, weights, im2col_step)
            ctx.save_for_backward(value, shapes, start, locations, weights)
            return out

        @staticmethod
        def backward(ctx, grad_output):
            value, shapes, start, locations, weights = ctx.saved_tensors
            grads = ext.ms_deform_attn_backward(
                value, shapes, start, locations, weights, grad_output.contiguous(), ctx.im2col_step
            )
            return grads[0], None, None, grads[1], grads[2], None

    def run(value, spatial_shapes, sampling_locations, weights):
        shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=value.device)
        start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
        args = (value, shapes, start, sampling_locations, weights)
        return _Function.apply(*(t.contiguous() for t in args), 64)

    return run


_cuda = _official_cuda_kernel()
if _cuda is not None:
    register_kernel("cuda", _cuda, supports=lambda value: value.is_cuda)


def select_kernel(name: str, value: torch.Tensor) -> Callable:
    """The kernel function for ``name`` ("auto", "pytorch" or another registered name).

    Raises:
        ValueError: unknown name, or a forced kernel that does not support ``value``.
    """
    if name == "auto":
        for key, kernel in MSDA_KERNELS.items():
            if key != "pytorch" and kernel.supports(value):
                return kernel.fn
        return MSDA_KERNELS["pytorch"].fn
    if name not in MSDA_KERNELS:
        raise ValueError(
            f"Unknown deformable-attention kernel {name!r} (MODEL.DETR.DEFORMABLE.ATTN_KERNEL); "
            f"available here: {['auto'] + sorted(MSDA_KERNELS)}. 'cuda' needs the compiled "
            "MultiScaleDeformableAttention extension of the official Deformable-DETR code."
        )
    kernel = MSDA_KERNELS[name]
    if not kernel.supports(value):
        raise ValueError(
            f"Deformable-attention kernel {name!r} does not support {value.device.type} "
            f"{value.dtype} tensors; use 'auto' or 'pytorch' (MODEL.DETR.DEFORMABLE.ATTN_KERNEL)."
        )
    return kernel.fn


def ms_deform_attn(value, spatial_shapes: Shapes, sampling_locations, weights, kernel="auto"):
    """:func:`ms_deform_attn_core_pytorch` computed by the kernel ``kernel`` selects."""
    return select_kernel(kernel, value)(value, spatial_shapes, sampling_locations, weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with its projections (batch-first).

    Sampling offsets and attention weights are linear in the query. For a 2-d reference point
    ``r`` the location on level l is ``r + offset / (w_l, h_l)`` (offsets in cells of that level);
    for a 4-d reference box ``(cx, cy, w, h)`` it is ``(cx, cy) + offset / n_points * (w, h) / 2``.

    Args:
        d_model (int): width d.
        n_levels (int): feature levels L.
        n_heads (int): heads H (must divide d).
        n_points (int): sampling points P per head and level.
        kernel (str): see :func:`select_kernel`.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        kernel: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.kernel = kernel
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's initialisation: head h starts with its points on a ray at angle
        ``2 pi h / H``, point p at distance p + 1 (cells); uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query,
        reference,
        value,
        spatial_shapes: Shapes,
        padding_mask: Optional[torch.Tensor] = None,
        point_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ):
        """
        Args:
            query (Tensor): (B, N, d) queries (content + position).
            reference (Tensor): (B, N, L, 2) points (x, y) or (B, N, L, 4) boxes (cx, cy, w, h),
                normalised to each level's (padded) map.
            value (Tensor): (B, S, d) flattened multi-scale input, S = sum(h_l * w_l).
            spatial_shapes: L pairs (h_l, w_l).
            padding_mask (Tensor): (B, S) bool, True on padding (values zeroed).
            point_mask (Tensor): optional (N,) bool for 4-d ``reference``: True marks rows that
                are points (their w, h are ignored and offsets are in cells, as for 2-d).
            need_weights (bool): also return the (B, H, N, S) attention map over the memory
                tokens (:func:`sampling_attention_map`), computed next to the kernel: the output
                is the same, bit for bit, as without ``need_weights``.

        Returns:
            Tensor: (B, N, d), or a tuple (output, map) when ``need_weights``.
        """
        bsz, num_q, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != levels or reference.shape[2] != levels:
            raise ValueError(
                f"MSDeformAttn has {levels} levels but got {len(spatial_shapes)} feature maps "
                f"and references for {reference.shape[2]}"
            )
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(bsz, -1, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(bsz, num_q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(bsz, num_q, heads, levels * points)
        weights = weights.softmax(-1).view(bsz, num_q, heads, levels, points)
        shapes = torch.as_tensor(spatial_shapes, dtype=query.dtype, device=query.device)
        cell = 1.0 / shapes.flip(-1)  # (L, 2): 1 / (w_l, h_l)
        if reference.shape[-1] == 2:
            scale = cell.expand(bsz, num_q, levels, 2)
        elif reference.shape[-1] == 4:
            scale = reference[..., 2:] * (0.5 / points)
            if point_mask is not None:
                scale = torch.where(point_mask[None, :, None, None], cell, scale)
        else:
            raise ValueError(f"reference must end in 2 or 4 coordinates, got {reference.shape}")
        locations = (
            reference[:, :, None, :, None, :2] + offsets * scale[:, :, None, :, None, :]
        )  # (B, N, H, L, P, 2)
        out = ms_deform_attn(value, spatial_shapes, locations, weights, self.kernel)
        out = self.output_proj(out)
        if not need_weights:
            return out
        return out, sampling_attention_map(spatial_shapes, locations, weights, padding_mask)

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
            f"n_points={self.n_points}, kernel={self.kernel!r}"
        )
