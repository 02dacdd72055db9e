# Copyright (c) kd_detr contributors.
"""D-FINE's decoder (Peng et al., "D-FINE: Redefine Regression Task in DETRs as Fine-grained
Distribution Refinement", ICLR 2025).

Differences from RT-DETR's decoder: the cross-attention reads the memory without value / output
projections and is merged with the residual by a gate; layer 0 first predicts a coarse box
(``pre_bbox_head``) that every later layer refines as four edge distances, each a distribution over
``num_bins + 1`` bins of a non-uniform weighting function (fine-grained distribution refinement,
FDR), the distributions (logits) accumulating from layer to layer; a location-quality estimator
(LQE) adds a score computed from the distributions' top probabilities to the class logits.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..box_ops import box_xyxy_to_cxcywh
from .layers import FFN, MLP, MultiheadAttention
from .rtdetr_decoder import RTDETRDeformableAttention, inverse_sigmoid

__all__ = ["DFineDecoder", "LQE", "distance2bbox", "weighting_function"]


def weighting_function(num_bins: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """The non-uniform bin values W(n), n = 0 .. num_bins: 0 in the middle, growing
    geometrically towards +-(up x reg_scale) and ending at +-(2 x up x reg_scale).

    Args:
        up, reg_scale (Tensor): (1,) scalars.

    Returns:
        Tensor: (num_bins + 1,).
    """
    bound = up.abs() * reg_scale.abs()  # (1,)
    step = (bound + 1) ** (2 / (num_bins - 2))
    left = [-(step**i) + 1 for i in range(num_bins // 2 - 1, 0, -1)]
    right = [step**i - 1 for i in range(1, num_bins // 2)]
    return torch.cat([-2 * bound, *left, torch.zeros_like(bound), *right, 2 * bound])


def distance2bbox(points: torch.Tensor, distance: torch.Tensor, reg_scale: torch.Tensor):
    """Boxes (..., 4) cxcywh from reference boxes ``points`` (..., 4) cxcywh and edge distances
    (left, top, right, bottom) in units of ``size / reg_scale``, offset by half of reg_scale."""
    reg_scale = reg_scale.abs()
    half = 0.5 * reg_scale
    cx, cy, w, h = points.unbind(-1)
    x0 = cx - (half + distance[..., 0]) * (w / reg_scale)
    y0 = cy - (half + distance[..., 1]) * (h / reg_scale)
    x1 = cx + (half + distance[..., 2]) * (w / reg_scale)
    y1 = cy + (half + distance[..., 3]) * (h / reg_scale)
    return box_xyxy_to_cxcywh(torch.stack([x0, y0, x1, y1], -1))


class LQE(nn.Module):
    """Location-quality estimator: ``MLP(top-k probabilities of each edge distribution and their
    mean)`` -> one score added to every class logit."""

    def __init__(self, num_bins: int, top_k: int = 4, hidden_dim: int = 64, num_layers: int = 2):
        super().__init__()
        self.num_bins = num_bins
        self.top_k = top_k
        self.reg_conf = MLP(4 * (top_k + 1), hidden_dim, 1, num_layers)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """scores (B, N, C), corners (B, N, 4 (num_bins + 1)) logits -> (B, N, C)."""
        bsz, num = corners.shape[:2]
        prob = corners.reshape(bsz, num, 4, self.num_bins + 1).softmax(-1)
        top = prob.topk(self.top_k, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(bsz, num, -1)
        return scores + self.reg_conf(stat)


class Gate(nn.Module):
    """``LayerNorm(g1 * residual + g2 * x)`` with ``(g1, g2) = sigmoid(Linear([residual, x]))``."""

    def __init__(self, d: int):
        super().__init__()
        self.gate = nn.Linear(2 * d, 2 * d)
        self.norm = nn.LayerNorm(d)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, residual, x):
        g1, g2 = torch.sigmoid(self.gate(torch.cat([residual, x], -1))).chunk(2, dim=-1)
        return self.norm(g1 * residual + g2 * x)


class DFineDecoderLayer(nn.Module):
    """Self-attention + LayerNorm, gated projection-free deformable cross-attention, FFN +
    LayerNorm (input clamped to the float16 range)."""

    def __init__(self, d, heads, ffn_dim, dropout, act, cross_attn: nn.Module):
        super().__init__()
        self.self_attn = MultiheadAttention(d, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(d)
        self.cross_attn = cross_attn
        self.gateway = Gate(d)
        self.ffn = FFN(d, ffn_dim, dropout, act)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos, boxes, memory, spatial_shapes, self_attn_mask=None):
        q = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x, attn_mask=self_attn_mask)))
        attn = self.cross_attn(x + pos, boxes, memory, spatial_shapes)
        x = self.gateway(x, self.dropout(attn))
        x = x + self.dropout(self.ffn(x))
        return self.norm3(x.clamp(min=-65504, max=65504))


class DFineDecoder(nn.Module):
    """L D-FINE decoder layers with fine-grained distribution refinement.

    Args:
        d_model, num_layers, heads, ffn_dim, dropout, activation: transformer sizes.
        points, offset_scale, method, kernel: deformable sampling (see
            :class:`RTDETRDeformableAttention`).
        num_bins (int): bins per edge distribution minus one (32).
        reg_scale (float), up (float): weighting-function curvature and range (4, 0.5).
        lqe_top_k, lqe_hidden_dim, lqe_layers: the LQE's statistics and MLP.
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
        num_bins: int = 32,
        reg_scale: float = 4.0,
        up: float = 0.5,
        lqe_top_k: int = 4,
        lqe_hidden_dim: int = 64,
        lqe_layers: int = 2,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_decoder_layers = num_layers
        self.num_bins = num_bins
        self.layers = nn.ModuleList(
            DFineDecoderLayer(
                d_model, heads, ffn_dim, dropout, activation,
                RTDETRDeformableAttention(
                    d_model, heads, points, offset_scale, method, kernel, projections=False
                ),
            )
            for _ in range(num_layers)
        )  # fmt: skip
        self.query_pos_head = MLP(4, 2 * d_model, d_model, 2)
        self.pre_bbox_head = MLP(d_model, d_model, 4, 3)
        self.lqe_layers = nn.ModuleList(
            LQE(num_bins, lqe_top_k, lqe_hidden_dim, lqe_layers) for _ in range(num_layers)
        )
        self.register_buffer("reg_scale", torch.tensor([float(reg_scale)]))
        self.register_buffer("up", torch.tensor([float(up)]))

    def project(self) -> torch.Tensor:
        """(num_bins + 1,) bin values of the weighting function."""
        return weighting_function(self.num_bins, self.up, self.reg_scale)

    def integral(self, corners: torch.Tensor) -> torch.Tensor:
        """Expected edge distances (..., 4) of corner logits (..., 4 (num_bins + 1))."""
        prob = corners.reshape(*corners.shape[:-1], 4, self.num_bins + 1).softmax(-1)
        return F.linear(prob, self.project().to(prob.dtype)[None])[..., 0]

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
            boxes (Tensor): (B, N, 4) initial reference boxes (detached).
            memory (Tensor): (B, S, d) flattened multi-scale maps.
            spatial_shapes: L pairs (h, w).
            box_heads: L distribution heads (d -> 4 (num_bins + 1)).
            self_attn_mask (Tensor): (N, N) or (B, N, N) bool, True = blocked.

        Returns:
            dict: "hidden_states" (L, B, N, d), "reference_boxes" (L, B, N, 4) every layer's
            input boxes (detached), "pred_boxes" (L, B, N, 4), "pred_corners" (L, B, N,
            4 (num_bins + 1)) the accumulated distribution logits, "initial_boxes" (B, N, 4) the
            coarse layer-0 boxes (detached) all layers refine, "pre_boxes" (B, N, 4) the coarse
            boxes with gradient.
        """
        x, ref = content, boxes.detach()
        prev_x = prev_corners = 0
        out = {k: [] for k in ("hidden_states", "reference_boxes", "pred_boxes", "pred_corners")}
        for i, (layer, head) in enumerate(zip(self.layers, box_heads)):
            pos = self.query_pos_head(ref).clamp(min=-10, max=10)
            x = layer(x, pos, ref, memory, spatial_shapes, self_attn_mask)
            if i == 0:
                pre_boxes = (self.pre_bbox_head(x) + inverse_sigmoid(ref)).sigmoid()
                initial = pre_boxes.detach()
            corners = head(x + prev_x) + prev_corners
            pred = distance2bbox(initial, self.integral(corners), self.reg_scale)
            out["hidden_states"].append(x)
            out["reference_boxes"].append(ref)
            out["pred_boxes"].append(pred)
            out["pred_corners"].append(corners)
            prev_x, prev_corners, ref = x.detach(), corners, pred.detach()
        out = {k: torch.stack(v) for k, v in out.items()}
        out.update(initial_boxes=initial, pre_boxes=pre_boxes)
        return out
