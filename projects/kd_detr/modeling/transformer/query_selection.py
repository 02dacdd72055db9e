# Copyright (c) kd_detr contributors.
"""Query selection for two-stage DETRs (Deformable DETR, DINO): every encoder token proposes a
box, the top-scoring proposals become the decoder's reference boxes."""
import math
from typing import Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "EncoderProposals",
    "ProposalQueryEmbedding",
    "box_sine_embedding_xywh",
    "topk_indices",
    "topk_proposals",
]


def box_sine_embedding_xywh(boxes, num_feats: int = 128, temperature: float = 10000.0):
    """Sine embedding of boxes in (cx, cy, w, h) block order (Deformable DETR's two-stage
    queries): coordinate c gives ``sin(2 pi c / T^(2i/F))`` at channel 2i and ``cos`` at 2i + 1.

    Args:
        boxes (Tensor): (..., 4) in [0, 1].

    Returns:
        Tensor: (..., 4 * num_feats), computed in float32 and cast back to ``boxes.dtype``.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = boxes.float()[..., None] * (2 * math.pi) / dim_t  # (..., 4, F)
    emb = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return emb.flatten(-2).to(boxes.dtype)


class EncoderProposals(nn.Module):
    """One proposal per unpadded encoder token: a box of side ``0.05 * 2^level`` centred on the
    token, plus the token's features through a linear layer and LayerNorm (for the heads).

    Proposals with a coordinate outside (0.01, 0.99), and padding tokens, get +inf logits and
    zero features, as in the paper's code.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)

    @staticmethod
    def proposal_logits(padding_mask, spatial_shapes: Sequence[Tuple[int, int]], dtype):
        """(B, S, 4) inverse-sigmoid proposal boxes and (B, S, 1) validity."""
        bsz = padding_mask.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes):
            mask = padding_mask[:, start : start + h * w].view(bsz, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            ys, xs = torch.meshgrid(
                torch.linspace(0, h - 1, h, dtype=dtype, device=mask.device),
                torch.linspace(0, w - 1, w, dtype=dtype, device=mask.device),
                indexing="ij",
            )
            grid = torch.stack([xs, ys], -1)  # (h, w, 2)
            scale = torch.stack([valid_w, valid_h], -1).view(bsz, 1, 1, 2).to(dtype)
            grid = (grid[None] + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * 2.0**lvl)
            proposals.append(torch.cat([grid, wh], -1).view(bsz, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        logits = torch.log(proposals / (1 - proposals))
        logits = logits.masked_fill(padding_mask[..., None] | ~valid, float("inf"))
        return logits, valid

    def forward(self, memory, padding_mask, spatial_shapes):
        """
        Args:
            memory (Tensor): (B, S, d) encoder output.
            padding_mask (Tensor): (B, S) bool, True on padding.
            spatial_shapes: L pairs (h_l, w_l).

        Returns:
            tuple[Tensor, Tensor]: token features (B, S, d) and proposal logits (B, S, 4).
        """
        logits, valid = self.proposal_logits(padding_mask, spatial_shapes, memory.dtype)
        features = memory.masked_fill(padding_mask[..., None] | ~valid, 0.0)
        return self.enc_output_norm(self.enc_output(features)), logits


def topk_indices(scores, k: int) -> torch.Tensor:
    """(B, k) indices of the k highest ``scores`` (B, S) per image."""
    if k > scores.shape[1]:
        raise ValueError(
            f"two-stage query selection needs {k} proposals (MODEL.DETR.NUM_QUERIES) but the "
            f"feature maps have only {scores.shape[1]} tokens; use larger images or fewer queries"
        )
    return scores.topk(k, dim=1).indices


def topk_proposals(scores, coord_logits, k: int):
    """Coordinate logits (B, k, 4) of the k highest ``scores`` (B, S) per image, detached."""
    index = topk_indices(scores, k)
    return coord_logits.gather(1, index[..., None].expand(-1, -1, 4)).detach()


class ProposalQueryEmbedding(nn.Module):
    """Deformable DETR's two-stage queries: the sine embedding of a box through a linear layer
    and LayerNorm of width 2d, split into a positional query and a content query."""

    def __init__(self, d_model: int, temperature: float = 10000.0):
        super().__init__()
        self.d_model = d_model
        self.temperature = temperature
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)

    def forward(self, boxes) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 4) boxes in [0, 1] -> (positional (B, N, d), content (B, N, d))."""
        emb = box_sine_embedding_xywh(boxes, self.d_model // 2, self.temperature)
        out = self.pos_trans_norm(self.pos_trans(emb))
        return out[..., : self.d_model], out[..., self.d_model :]
