# Copyright (c) kd_detr contributors.
"""Building blocks shared by DETR-family transformers (batch-first tensors throughout)."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FFN",
    "MLP",
    "MultiheadAttention",
    "build_activation",
    "multi_head_attention",
    "split_attention_maps",
    "stack_attention_maps",
]


def build_activation(name: str) -> nn.Module:
    """"relu", "gelu", "glu" or "prelu" (DAB-DETR) as a module."""
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "glu": nn.GLU, "prelu": nn.PReLU}
    if name not in table:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]()


def _merge_masks(attn_mask, key_padding_mask, dtype):
    """Combine both masks into one SDPA mask broadcastable to (B, heads, Lq, S), or None.

    A boolean mask is True where attention is *blocked* (PyTorch nn.MultiheadAttention
    convention); a float ``attn_mask`` is added to the attention logits.
    """
    if attn_mask is not None:
        attn_mask = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None]
    kpm = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if attn_mask is None and kpm is None:
        return None
    if attn_mask is None or attn_mask.dtype == torch.bool:
        blocked = kpm if attn_mask is None else (attn_mask if kpm is None else attn_mask | kpm)
        return ~blocked  # SDPA: True = may attend
    mask = attn_mask.to(dtype)
    if kpm is not None:
        mask = mask + torch.zeros(kpm.shape, dtype=dtype, device=kpm.device).masked_fill(
            kpm, float("-inf")
        )
    return mask


def multi_head_attention(
    q,
    k,
    v,
    num_heads: int,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    scale: Optional[float] = None,
    need_weights: bool = False,
):
    """Scaled dot-product attention over already projected, batch-first inputs.

    Queries/keys and values may have different widths (as in DAB-DETR's conditional attention).

    Args:
        q (Tensor): (B, Lq, Dqk) queries.
        k (Tensor): (B, S, Dqk) keys.
        v (Tensor): (B, S, Dv) values.
        num_heads (int): heads; must divide Dqk and Dv.
        attn_mask (Tensor): (Lq, S) or (B, Lq, S); bool True = blocked, or float added to logits.
        key_padding_mask (Tensor): (B, S) bool, True on keys to ignore (padding).
        dropout (float): dropout on attention weights (pass 0 in eval).
        scale (float): logit scale; default ``(Dqk / num_heads) ** -0.5``.
        need_weights (bool): also return the (B, heads, Lq, S) attention weights (before
            dropout), computed next to the fused kernel: the output is the same, bit for bit, as
            without ``need_weights``.

    Returns:
        Tensor: (B, Lq, Dv), or a tuple (output, weights) when ``need_weights``.
    """
    bsz, len_q, dim_qk = q.shape
    len_k, dim_v = k.shape[1], v.shape[2]
    q = q.reshape(bsz, len_q, num_heads, dim_qk // num_heads).transpose(1, 2)
    k = k.reshape(bsz, len_k, num_heads, dim_qk // num_heads).transpose(1, 2)
    v = v.reshape(bsz, len_k, num_heads, dim_v // num_heads).transpose(1, 2)
    mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    out = out.transpose(1, 2).reshape(bsz, len_q, dim_v)
    if not need_weights:
        return out
    scale = (dim_qk // num_heads) ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, h, Lq, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask
    return out, logits.softmax(-1)


def stack_attention_maps(maps) -> Dict[str, torch.Tensor]:
    """Per decoder layer (self-attention weights (B, h, N, N), cross-attention weights
    (B, h, N, S)) -> {"self_attn": (L, B, h, N, N), "cross_attn": (L, B, h, N, S)}."""
    return {
        "self_attn": torch.stack([m[0] for m in maps]),
        "cross_attn": torch.stack([m[1] for m in maps]),
    }


def split_attention_maps(maps: Dict[str, torch.Tensor], sizes) -> List[Dict[str, torch.Tensor]]:
    """The maps of one decoder pass over consecutive query sets of ``sizes`` queries, per set:
    its own diagonal block of the self-attention (its queries attending to its queries) and its
    rows of the cross-attention. With a mask that keeps the sets apart the block holds every
    non-zero weight of those rows."""
    parts, start = [], 0
    for n in sizes:
        end = start + n
        parts.append(
            {
                "self_attn": maps["self_attn"][..., start:end, start:end],
                "cross_attn": maps["cross_attn"][..., start:end, :],
            }
        )
        start = end
    return parts


class MultiheadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (batch-first).

    Args:
        embed_dim (int): model width d.
        num_heads (int): number of heads.
        dropout (float): dropout on the attention weights (training only).
        bias (bool): projections have biases.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._reset_parameters()

    def _reset_parameters(self):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, need_weights=False):
        """
        Args:
            query (Tensor): (B, Lq, d).
            key (Tensor): (B, S, d).
            value (Tensor): (B, S, d).
            attn_mask (Tensor): (Lq, S) or (B, Lq, S), see :func:`multi_head_attention`.
            key_padding_mask (Tensor): (B, S) bool, True on padding.
            need_weights (bool): also return (B, heads, Lq, S) attention weights.

        Returns:
            Tensor: (B, Lq, d), or (output, weights) when ``need_weights``.
        """
        out = multi_head_attention(
            self.q_proj(query),
            self.k_proj(key),
            self.v_proj(value),
            self.num_heads,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            dropout=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )
        if need_weights:
            return self.out_proj(out[0]), out[1]
        return self.out_proj(out)


class FFN(nn.Module):
    """Position-wise feed-forward block ``linear2(dropout(act(linear1(x))))`` (no residual)."""

    def __init__(
        self, d_model: int, dim_feedforward: int, dropout: float = 0.0, activation: str = "relu"
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = build_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

    def forward(self, x):
        """(..., d_model) -> (..., d_model)."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box head).

    Args:
        input_dim (int): input width.
        hidden_dim (int): width of the hidden layers.
        output_dim (int): output width.
        num_layers (int): number of linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x):
        """(..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
