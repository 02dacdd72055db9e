# Copyright (c) kd_detr contributors.
"""RT-DETR / RT-DETRv2 decoder: deformable cross-attention around each query's reference box,
positional queries ``MLP(box)``, and iterative box refinement by per-layer box heads.

v1 and v2 differ only in the cross-attention sampling (:class:`RTDETRDeformableAttention`):
v2 may give every level its own number of sampling points, scales offsets by ``offset_scale``
(0.5 = v1) and can sample the nearest cell ("discrete", for TensorRT without grid_sample)
instead of bilinearly.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FFN, MLP, MultiheadAttention
from .ms_deform_attn import MSDeformAttn, ms_deform_attn

__all__ = ["RTDETRDecoder", "RTDETRDeformableAttention", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _sample_levels(value, shapes, locations, weights, points: Sequence[int], discrete: bool):
    """Pure-PyTorch sampling with per-level point counts.

    Args:
        value (Tensor): (B, S, H, Dh).
        shapes: L pairs (h, w).
        locations (Tensor): (B, Q, H, sum(points), 2) in [0, 1].
        weights (Tensor): (B, Q, H, sum(points)).
        points: points per level.
        discrete (bool): read the nearest cell (clamped to the map) instead of bilinear samples.

    Returns:
        Tensor: (B, Q, H * Dh).
    """
    bsz, _, heads, dh = value.shape
    num_q = locations.shape[1]
    values = value.split([h * w for h, w in shapes], dim=1)
    locs = locations.transpose(1, 2).flatten(0, 1).split(list(points), dim=-2)  # (B*H, Q, P_l, 2)
    out = 0
    start = 0
    for (h, w), v, loc, p in zip(shapes, values, locs, points):
        v = v.flatten(2).transpose(1, 2).reshape(bsz * heads, dh, h, w)
        if discrete:
            size = torch.tensor([w, h], device=loc.device, dtype=loc.dtype)
            idx = (loc * size + 0.5).to(torch.int64)
            x, y = idx[..., 0].clamp(0, w - 1), idx[..., 1].clamp(0, h - 1)
            flat = (y * w + x).flatten(1)  # (B*H, Q*P)
            sampled = v.flatten(2).gather(2, flat[:, None].expand(-1, dh, -1)).view(
                bsz * heads, dh, num_q, p
            )
        else:
            sampled = F.grid_sample(v, 2 * loc - 1, "bilinear", "zeros", align_corners=False)
        wgt = weights[..., start : start + p].transpose(1, 2).flatten(0, 1)  # (B*H, Q, P)
        out = out + (sampled * wgt[:, None]).sum(-1)
        start += p
    return out.view(bsz, heads * dh, num_q).transpose(1, 2)


class RTDETRDeformableAttention(MSDeformAttn):
    """Deformable attention around 4-d reference boxes: point p of level l sits at
    ``(cx, cy) + offset / P_l * (w, h) * offset_scale``.

    Args:
        d_model, n_heads: width and heads.
        points (Sequence[int]): sampling points of every level (RT-DETR: 4 on each of 3).
        offset_scale (float): 0.5 in RT-DETR (v1 and v2 default).
        method (str): "default" (bilinear) or "discrete" (nearest cell, v2 option).
        kernel (str): deformable-attention kernel for uniform points and "default".
        projections (bool): value and output projections (D-FINE has none: identities).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        points: Sequence[int],
        offset_scale: float = 0.5,
        method: str = "default",
        kernel: str = "auto",
        projections: bool = True,
    ):
        points = list(points)
        if method not in ("default", "discrete"):
            raise ValueError(
                f"MODEL.RTDETR.SAMPLING_METHOD must be 'default' or 'discrete', got {method!r}"
            )
        super().__init__(d_model, len(points), n_heads, max(points), kernel)
        self.points = points
        self.offset_scale = offset_scale
        self.method = method
        total = sum(points)
        self.sampling_offsets = nn.Linear(d_model, n_heads * total * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * total)
        scale = torch.tensor([1.0 / p for p in points for _ in range(p)])
        self.register_buffer("point_scale", scale, persistent=False)
        if not projections:
            self.value_proj, self.output_proj = nn.Identity(), nn.Identity()
        self._reset_offsets()

    def _reset_offsets(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        heads = self.n_heads
        thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * torch.pi / heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        ranks = torch.cat([torch.arange(1, p + 1, dtype=torch.float32) for p in self.points])
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((grid[:, None] * ranks[None, :, None]).flatten())

    def forward(self, query, reference, value, spatial_shapes, padding_mask=None, point_mask=None):
        """
        Args:
            query (Tensor): (B, N, d) content + position.
            reference (Tensor): (B, N, 4) cxcywh boxes in [0, 1] (shared by all levels).
            value (Tensor): (B, S, d) flattened maps.
            spatial_shapes: L pairs (h, w).

        Returns:
            Tensor: (B, N, d).
        """
        bsz, num_q, _ = query.shape
        heads, total = self.n_heads, sum(self.points)
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(
                f"deformable attention has {self.n_levels} levels, got {len(spatial_shapes)} maps"
            )
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(bsz, -1, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(bsz, num_q, heads, total, 2)
        weights = self.attention_weights(query).view(bsz, num_q, heads, total).softmax(-1)
        scale = self.point_scale.to(query.dtype)[:, None] * self.offset_scale
        ref = reference[:, :, None, None, :]
        locations = ref[..., :2] + offsets * scale * ref[..., 2:]  # (B, N, H, total, 2)
        uniform = len(set(self.points)) == 1
        if self.method == "default" and uniform:
            shape = (bsz, num_q, heads, self.n_levels, self.points[0])
            out = ms_deform_attn(
                value, spatial_shapes, locations.view(shape + (2,)), weights.view(shape),
                self.kernel,
            )  # fmt: skip
        else:
            out = _sample_levels(
                value, spatial_shapes, locations, weights, self.points, self.method == "discrete"
            )
        return self.output_proj(out)

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, points={self.points}, "
            f"offset_scale={self.offset_scale}, method={self.method!r}"
        )


class RTDETRDecoderLayer(nn.Module):
    """Self-attention (positions on queries and keys), deformable cross-attention and FFN, each
    followed by a residual sum and LayerNorm."""

    def __init__(self, d, heads, ffn_dim, dropout, act, cross_attn: nn.Module):
        super().__init__()
        self.self_attn = MultiheadAttention(d, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(d)
        self.cross_attn = cross_attn
        self.norm2 = nn.LayerNorm(d)
        self.ffn = FFN(d, ffn_dim, dropout, act)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos, boxes, memory, spatial_shapes, self_attn_mask=None):
        q = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x, attn_mask=self_attn_mask)))
        x = self.norm2(x + self.dropout(self.cross_attn(x + pos, boxes, memory, spatial_shapes)))
        return self.norm3(x + self.dropout(self.ffn(x)))


class RTDETRDecoder(nn.Module):
    """L decoder layers with box refinement.

    Args:
        d_model (int): width d.
        num_layers (int): L.
        heads (int): attention heads.
        ffn_dim (int): FFN width.
        dropout (float): dropout.
        activation (str): FFN activation ("relu").
        points (Sequence[int]): sampling points per level.
        offset_scale (float), method (str), kernel (str): see :class:`RTDETRDeformableAttention`.
        look_forward_twice (bool): in training, layer l's boxes start from layer l-1's boxes
            without detaching them (RT-DETR's official code), so layer l's box loss also trains
            layer l-1; values are unchanged, only gradients differ.
    """

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 6,
        heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        points: Sequence[int] = (4, 4, 4),
        offset_scale: float = 0.5,
        method: str = "default",
        kernel: str = "auto",
        look_forward_twice: bool = True,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_decoder_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.layers = nn.ModuleList(
            RTDETRDecoderLayer(
                d_model, heads, ffn_dim, dropout, activation,
                RTDETRDeformableAttention(d_model, heads, points, offset_scale, method, kernel),
            )
            for _ in range(num_layers)
        )  # fmt: skip
        self.query_pos_head = MLP(4, 2 * d_model, d_model, 2)

    def forward(
        self,
        content: torch.Tensor,
        boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes,
        box_heads: List[nn.Module],
        self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            content (Tensor): (B, N, d) initial content queries.
            boxes (Tensor): (B, N, 4) initial reference boxes in [0, 1] (detached).
            memory (Tensor): (B, S, d) flattened multi-scale maps.
            spatial_shapes: L pairs (h, w).
            box_heads: L box heads; layer l's boxes are
                ``sigmoid(box_heads[l](h_l) + inverse_sigmoid(r_l))``.
            self_attn_mask (Tensor): (N, N) or (B, N, N) bool, True = blocked.

        Returns:
            dict: "hidden_states" (L, B, N, d), "reference_boxes" (L, B, N, 4) every layer's
            input boxes (detached) and "pred_boxes" (L, B, N, 4).
        """
        x, ref = content, boxes.detach()
        prev = ref  # the undetached previous boxes (look forward twice)
        hs, refs, preds = [], [], []
        for layer, head in zip(self.layers, box_heads):
            pos = self.query_pos_head(ref)
            x = layer(x, pos, ref, memory, spatial_shapes, self_attn_mask)
            delta = head(x)
            base = prev if (self.training and self.look_forward_twice) else ref
            pred = (delta + inverse_sigmoid(base)).sigmoid()
            hs.append(x)
            refs.append(ref)
            preds.append(pred)
            prev = (delta + inverse_sigmoid(ref)).sigmoid()
            ref = prev.detach()
        return {
            "hidden_states": torch.stack(hs),
            "reference_boxes": torch.stack(refs),
            "pred_boxes": torch.stack(preds),
        }
