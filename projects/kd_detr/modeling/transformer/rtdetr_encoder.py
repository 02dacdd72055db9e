# Copyright (c) kd_detr contributors.
"""RT-DETR's hybrid encoder (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR
2024): attention-based intra-scale feature interaction (AIFI, a transformer encoder on the coarsest
map only) and CNN-based cross-scale feature fusion (CCFF, a top-down FPN and a bottom-up PAN of
CSP blocks made of RepVGG blocks). D-FINE's variant (``style="dfine"``) fuses with RepNCSPELAN4
blocks, downsamples with SCDown (1x1 conv, depthwise 3x3 stride-2 conv) and has linear lateral
convs. Module names follow transformers' ``RTDetrHybridEncoder`` / ``DFineHybridEncoder``."""
import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FFN, MultiheadAttention

__all__ = ["ConvNormLayer", "CSPRepLayer", "HybridEncoder", "sincos_2d_position_embedding"]


def _activation(name: str) -> nn.Module:
    table = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "none": nn.Identity}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]()


class ConvNormLayer(nn.Module):
    """Conv (no bias, 'same' padding) -> BatchNorm -> activation ("none": identity)."""

    def __init__(self, cin, cout, kernel: int, stride: int = 1, act: str = "none", groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False
        )
        self.norm = nn.BatchNorm2d(cout)
        self.activation = _activation(act)

    def forward(self, x):
        return self.activation(self.norm(self.conv(x)))


class RepVggBlock(nn.Module):
    """act(conv3x3(x) + conv1x1(x)) (training form; not re-parameterised)."""

    def __init__(self, channels: int, act: str):
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3)
        self.conv2 = ConvNormLayer(channels, channels, 1)
        self.activation = _activation(act)

    def forward(self, x):
        return self.activation(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """Cross-stage-partial fusion block: (B, cin, H, W) -> (B, cout, H, W) as
    ``conv3(bottlenecks(conv1(x)) + conv2(x))``; hidden width ``cout * expansion``."""

    def __init__(self, cin: int, cout: int, num_blocks: int = 3, expansion=1.0, act="silu"):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = ConvNormLayer(cin, hidden, 1, act=act)
        self.conv2 = ConvNormLayer(cin, hidden, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, act) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, cout, 1, act=act) if hidden != cout else nn.Identity()

    def forward(self, x):
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class RepNCSPELAN4(nn.Module):
    """D-FINE's fusion block: (B, 2d, H, W) -> (B, d, H, W). A 1x1 conv to 2d split in halves;
    the second half goes through CSP + 3x3 conv twice (width ``c = round(expansion * d // 2)``);
    the halves and both branch outputs are concatenated and projected to d."""

    def __init__(self, d: int, expansion: float, num_blocks: int, act: str = "silu"):
        super().__init__()
        c = round(expansion * d // 2)
        self.conv_dim = d
        self.conv1 = ConvNormLayer(2 * d, 2 * d, 1, act=act)
        self.csp_rep1 = CSPRepLayer(d, c, num_blocks, 1.0, act)
        self.conv2 = ConvNormLayer(c, c, 3, act=act)
        self.csp_rep2 = CSPRepLayer(c, c, num_blocks, 1.0, act)
        self.conv3 = ConvNormLayer(c, c, 3, act=act)
        self.conv4 = ConvNormLayer(2 * d + 2 * c, d, 1, act=act)

    def forward(self, x):
        parts = list(self.conv1(x).split((self.conv_dim, self.conv_dim), 1))
        b1 = self.conv2(self.csp_rep1(parts[-1]))
        b2 = self.conv3(self.csp_rep2(b1))
        return self.conv4(torch.cat(parts + [b1, b2], 1))


class SCDown(nn.Module):
    """D-FINE's downsampling: 1x1 conv, then depthwise 3x3 stride-2 conv (both linear)."""

    def __init__(self, d: int):
        super().__init__()
        self.conv1 = ConvNormLayer(d, d, 1)
        self.conv2 = ConvNormLayer(d, d, 3, 2, groups=d)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def sincos_2d_position_embedding(height: int, width: int, dim: int, temperature: float, dtype):
    """(1, H * W, dim) fixed embedding, row-major tokens, channels [sin(y w) | cos(y w) |
    sin(x w) | cos(x w)] with ``w_i = temperature^(-i / (dim / 4))``, computed in float64."""
    if dim % 4 != 0:
        raise ValueError(f"the AIFI position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    ey, ex = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    return torch.cat([ey.sin(), ey.cos(), ex.sin(), ex.cos()], 1)[None].to(dtype)


class AIFILayer(nn.Module):
    """Post-norm (or pre-norm) transformer encoder layer; positions added to queries and keys."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float, act: str, pre_norm: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = FFN(d, ffn_dim, dropout, act)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x, pos):
        """(B, S, d) tokens and (1, S, d) positions -> (B, S, d)."""
        h = self.norm1(x) if self.pre_norm else x
        q = h + pos
        x = x + self.dropout(self.self_attn(q, q, h))
        if not self.pre_norm:
            x = self.norm1(x)
        h = self.norm2(x) if self.pre_norm else x
        x = x + self.dropout(self.ffn(h))
        return x if self.pre_norm else self.norm2(x)


class AIFI(nn.Module):
    """Transformer encoder on one feature map (B, d, H, W) -> (B, d, H, W)."""

    def __init__(self, d, heads, ffn_dim, num_layers, dropout, act, pre_norm, temperature):
        super().__init__()
        self.d = d
        self.temperature = temperature
        self.layers = nn.ModuleList(
            AIFILayer(d, heads, ffn_dim, dropout, act, pre_norm) for _ in range(num_layers)
        )

    def forward(self, x):
        bsz, d, h, w = x.shape
        pos = sincos_2d_position_embedding(h, w, d, self.temperature, x.dtype).to(x.device)
        tokens = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            tokens = layer(tokens, pos)
        return tokens.transpose(1, 2).reshape(bsz, d, h, w)


class HybridEncoder(nn.Module):
    """AIFI on the levels ``encode_levels`` (RT-DETR: the coarsest, index 2), then CCFF.

    Args:
        num_levels (int): input maps (all of width ``d``, fine to coarse, strides 2x apart).
        d (int): width.
        heads, ffn_dim, num_layers, dropout, act, pre_norm, temperature: AIFI's transformer.
        encode_levels (Sequence[int]): levels that get AIFI.
        expansion (float): CSP hidden width factor (RT-DETR R18/R34: 0.5, R50/R101: 1.0).
        csp_blocks (int): RepVGG blocks per CSP block (3; D-FINE: round(3 x depth_mult)).
        ccff_act (str): activation of the fusion convs ("silu").
        style (str): "rtdetr" (CSP fusion, activated lateral and stride-2 convs) or "dfine"
            (RepNCSPELAN4 fusion, linear lateral convs, SCDown).
    """

    def __init__(
        self,
        num_levels: int = 3,
        d: int = 256,
        heads: int = 8,
        ffn_dim: int = 1024,
        num_layers: int = 1,
        dropout: float = 0.0,
        act: str = "gelu",
        pre_norm: bool = False,
        temperature: float = 10000.0,
        encode_levels: Sequence[int] = (2,),
        expansion: float = 1.0,
        csp_blocks: int = 3,
        ccff_act: str = "silu",
        style: str = "rtdetr",
    ):
        super().__init__()
        if style not in ("rtdetr", "dfine"):
            raise ValueError(f"HybridEncoder style must be 'rtdetr' or 'dfine', got {style!r}")
        bad = [i for i in encode_levels if not 0 <= i < num_levels]
        if bad:
            raise ValueError(
                f"MODEL.RTDETR.ENCODE_LEVELS {list(encode_levels)} must index the {num_levels} "
                "input levels"
            )
        self.num_levels = num_levels
        self.d = d
        self.encode_levels = list(encode_levels) if num_layers > 0 else []
        self.aifi = nn.ModuleList(
            AIFI(d, heads, ffn_dim, num_layers, dropout, act, pre_norm, temperature)
            for _ in self.encode_levels
        )
        n = num_levels - 1

        dfine = style == "dfine"

        def fuse():
            if dfine:
                return RepNCSPELAN4(d, expansion, csp_blocks, ccff_act)
            return CSPRepLayer(2 * d, d, csp_blocks, expansion, ccff_act)

        lateral_act = "none" if dfine else ccff_act
        self.lateral_convs = nn.ModuleList(
            ConvNormLayer(d, d, 1, act=lateral_act) for _ in range(n)
        )
        self.fpn_blocks = nn.ModuleList(fuse() for _ in range(n))
        self.downsample_convs = nn.ModuleList(
            SCDown(d) if dfine else ConvNormLayer(d, d, 3, 2, act=ccff_act) for _ in range(n)
        )
        self.pan_blocks = nn.ModuleList(fuse() for _ in range(n))
        for m in self.modules():  # a 1x1/3x3 conv stack with BN: Kaiming-uniform default init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """L maps (B, d, H_l, W_l), fine to coarse -> L fused maps of the same shapes."""
        if len(feats) != self.num_levels:
            raise ValueError(f"HybridEncoder expects {self.num_levels} maps, got {len(feats)}")
        feats = list(feats)
        for aifi, level in zip(self.aifi, self.encode_levels):
            feats[level] = aifi(feats[level])
        # top-down: inner[0] is the coarsest after its lateral conv
        inner = [feats[-1]]
        for i, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            top = lateral(inner[-1])
            inner[-1] = top
            up = F.interpolate(top, scale_factor=2.0, mode="nearest")
            inner.append(block(torch.cat([up, feats[self.num_levels - 2 - i]], 1)))
        inner.reverse()  # fine to coarse
        outs = [inner[0]]
        for i, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            outs.append(block(torch.cat([down(outs[-1]), inner[i + 1]], 1)))
        return outs
