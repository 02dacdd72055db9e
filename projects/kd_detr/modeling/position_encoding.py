# Copyright (c) kd_detr contributors.
"""2-D sine positional encoding of feature maps (DETR), with per-axis temperatures (DAB-DETR)."""
import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the (y, x) position of every unpadded feature-map cell.

    Positions count valid cells only (a cumulative sum over the non-padding mask), so padding does
    not shift the encoding of real pixels. Channel ``2i`` holds ``sin(p / T^(2i/F))`` and channel
    ``2i + 1`` holds ``cos`` of the same angle; the y encoding comes first, then x.

    Args:
        num_pos_feats (int): F, channels per axis; the output has 2F channels (use d_model / 2).
        temperature (float): T for both axes (DETR: 10000).
        normalize (bool): rescale positions to ``[0, scale]`` per image (DETR: True).
        scale (float): range after normalisation; default 2*pi. Only valid with ``normalize``.
        temperature_h (float): T for the y axis; overrides ``temperature`` (DAB-DETR uses 20).
        temperature_w (float): T for the x axis; overrides ``temperature``.
        offset (float): added to the positions before normalising (Deformable DETR uses -0.5).
        eps (float): avoids division by zero when normalising.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = False,
        scale: Optional[float] = None,
        temperature_h: Optional[float] = None,
        temperature_w: Optional[float] = None,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` requires normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature_h = float(temperature if temperature_h is None else temperature_h)
        self.temperature_w = float(temperature if temperature_w is None else temperature_w)
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def _encode(self, embed, temperature):
        # embed: (B, H, W) positions -> (B, H, W, F)
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=embed.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos = embed[..., None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(3)

    def forward(self, mask):
        """
        Args:
            mask (Tensor): (B, H, W) bool, True on padding.

        Returns:
            Tensor: (B, 2 * num_pos_feats, H, W) float32 encoding.
        """
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_y = self._encode(y_embed, self.temperature_h)
        pos_x = self._encode(x_embed, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self):
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature_h={self.temperature_h}, "
            f"temperature_w={self.temperature_w}, normalize={self.normalize}, "
            f"scale={self.scale:.4f}, offset={self.offset}"
        )
