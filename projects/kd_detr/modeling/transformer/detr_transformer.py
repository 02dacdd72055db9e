# Copyright (c) kd_detr contributors.
"""DETR's encoder-decoder (Carion et al., 2020): post-norm by default, batch-first tensors."""
from typing import Dict, Optional

import torch
from torch import nn

from detectron2.config import configurable

from .build import TRANSFORMER_REGISTRY
from .layers import FFN, MultiheadAttention, stack_attention_maps

__all__ = [
    "DETRTransformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]


def _with_pos(x, pos):
    return x if pos is None else x + pos


def transformer_args_from_config(cfg) -> Dict:
    """Keyword arguments of the DETR-family transformers read from ``cfg.MODEL.DETR``: width,
    heads, depths, FFN width, dropout and activation."""
    d = cfg.MODEL.DETR
    return {
        "d_model": d.HIDDEN_DIM,
        "nhead": d.NHEADS,
        "num_encoder_layers": d.ENC_LAYERS,
        "num_decoder_layers": d.DEC_LAYERS,
        "dim_feedforward": d.DIM_FEEDFORWARD,
        "dropout": d.DROPOUT,
        "activation": d.ACTIVATION,
    }


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform initialisation of every parameter of ``module`` with two or more dims."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _ResidualLayer(nn.Module):
    """Self-attention, then cross-attention (``has_cross_attn``), then FFN, each block with a
    dropped-out residual and a LayerNorm, after the residual sum (post-norm, as DETR) or before
    the block (pre-norm). Blocks i = 1, 2 (, 3) use ``norm{i}`` and ``dropout{i}``."""

    has_cross_attn = False

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        pre_norm: bool = False,
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        if self.has_cross_attn:
            self.cross_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.ffn = FFN(d_model, dim_feedforward, dropout, activation)
        blocks = range(1, 4 if self.has_cross_attn else 3)
        for i in blocks:
            self.add_module(f"norm{i}", nn.LayerNorm(d_model))
        for i in blocks:
            self.add_module(f"dropout{i}", nn.Dropout(dropout))
        self.pre_norm = pre_norm

    def _residual(self, x, norm: nn.Module, dropout: nn.Module, block):
        """``x + dropout(block(.))`` with ``norm`` applied before ``block`` or after the sum."""
        out = x + dropout(block(norm(x) if self.pre_norm else x))
        return out if self.pre_norm else norm(out)


class TransformerEncoderLayer(_ResidualLayer):
    """Self-attention (position added to queries and keys) + FFN, each with a residual.

    Args:
        d_model (int): width d.
        nhead (int): attention heads.
        dim_feedforward (int): FFN hidden width.
        dropout (float): dropout on attention weights, inside the FFN and on both residual branches.
        activation (str): FFN activation.
        pre_norm (bool): LayerNorm before each block (else after the residual sum, as DETR).
    """

    def forward(self, src, pos=None, key_padding_mask=None):
        """
        Args:
            src (Tensor): (B, S, d) flattened feature map.
            pos (Tensor): (B, S, d) positional encoding.
            key_padding_mask (Tensor): (B, S) bool, True on padding.

        Returns:
            Tensor: (B, S, d).
        """

        def self_attn(x):
            q = k = _with_pos(x, pos)
            return self.self_attn(q, k, x, key_padding_mask=key_padding_mask)

        src = self._residual(src, self.norm1, self.dropout1, self_attn)
        return self._residual(src, self.norm2, self.dropout2, self.ffn)


class TransformerDecoderLayer(_ResidualLayer):
    """Self-attention among queries, cross-attention to the encoder memory, then FFN.

    Queries get ``query_pos`` in both attentions (queries and keys of the self-attention, queries of
    the cross-attention); memory keys get the spatial ``pos``. Arguments as in
    :class:`TransformerEncoderLayer`.
    """

    has_cross_attn = True

    def forward(
        self,
        tgt,
        memory,
        pos=None,
        query_pos=None,
        memory_key_padding_mask=None,
        self_attn_mask=None,
        need_weights: bool = False,
    ):
        """
        Args:
            tgt (Tensor): (B, N, d) query content.
            memory (Tensor): (B, S, d) encoder output.
            pos (Tensor): (B, S, d) spatial positional encoding of the memory.
            query_pos (Tensor): (B, N, d) query positional embedding.
            memory_key_padding_mask (Tensor): (B, S) bool, True on padding.
            self_attn_mask (Tensor): (N, N) or (B, N, N) bool, True where query i may not attend
                to query j (e.g. block-diagonal masks separating query groups).
            need_weights (bool): also return both attentions' weights (computed next to
                the fused kernel, which still gives the output; distillation of attention maps).

        Returns:
            Tensor: (B, N, d); with ``need_weights`` a tuple (output, self-attention weights
            (B, heads, N, N), cross-attention weights (B, heads, N, S)), each row a softmax
            (0 on blocked queries and padded memory tokens).
        """
        weights = []

        def attend(attn, q, k, v, **kwargs):
            if not need_weights:
                return attn(q, k, v, **kwargs)
            out, w = attn(q, k, v, need_weights=True, **kwargs)
            weights.append(w)
            return out

        def self_attn(x):
            q = k = _with_pos(x, query_pos)
            return attend(self.self_attn, q, k, x, attn_mask=self_attn_mask)

        def cross_attn(x):
            return attend(
                self.cross_attn,
                _with_pos(x, query_pos),
                _with_pos(memory, pos),
                memory,
                key_padding_mask=memory_key_padding_mask,
            )

        tgt = self._residual(tgt, self.norm1, self.dropout1, self_attn)
        tgt = self._residual(tgt, self.norm2, self.dropout2, cross_attn)
        tgt = self._residual(tgt, self.norm3, self.dropout3, self.ffn)
        return (tgt, *weights) if need_weights else tgt


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, with an optional final LayerNorm (used with pre-norm)."""

    def __init__(self, layers, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src, pos=None, key_padding_mask=None):
        """(B, S, d) -> (B, S, d); see :meth:`TransformerEncoderLayer.forward`."""
        for layer in self.layers:
            src = layer(src, pos=pos, key_padding_mask=key_padding_mask)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers sharing one final LayerNorm, applied to every layer's output
    (DETR's ``return_intermediate``); the un-normalised output feeds the next layer."""

    def __init__(self, layers, norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt, memory, need_weights: bool = False, **kwargs):
        """
        Args:
            tgt (Tensor): (B, N, d) query content.
            memory (Tensor): (B, S, d) encoder output.
            need_weights (bool): also return every layer's attention weights.
            kwargs: see :meth:`TransformerDecoderLayer.forward`.

        Returns:
            Tensor: (L, B, N, d), every layer's output after the final LayerNorm; with
            ``need_weights`` a tuple (that, :func:`~.layers.stack_attention_maps` of the layers).
        """
        outputs, maps = [], []
        for layer in self.layers:
            if need_weights:
                tgt, *weights = layer(tgt, memory, need_weights=True, **kwargs)
                maps.append(weights)
            else:
                tgt = layer(tgt, memory, **kwargs)
            outputs.append(self.norm(tgt))
        if need_weights:
            return torch.stack(outputs), stack_attention_maps(maps)
        return torch.stack(outputs)


@TRANSFORMER_REGISTRY.register()
class DETRTransformer(nn.Module):
    """DETR's transformer: ``encode`` the flattened feature map once, ``decode`` any query set.

    Args:
        d_model (int): width d.
        nhead (int): attention heads.
        num_encoder_layers (int): encoder depth.
        num_decoder_layers (int): decoder depth L.
        dim_feedforward (int): FFN hidden width.
        dropout (float): dropout rate.
        activation (str): FFN activation.
        pre_norm (bool): pre-LayerNorm layers (adds a final encoder LayerNorm).
    """

    @configurable
    def __init__(
        self,
        *,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        pre_norm: bool = False,
    ):
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, activation, pre_norm)
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(*args) for _ in range(num_encoder_layers)],
            nn.LayerNorm(d_model) if pre_norm else None,
        )
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(*args) for _ in range(num_decoder_layers)],
            nn.LayerNorm(d_model),
        )
        self.d_model = d_model
        self.nhead = nhead
        self.num_decoder_layers = num_decoder_layers
        self._reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        return {**transformer_args_from_config(cfg), "pre_norm": cfg.MODEL.DETR.PRE_NORM}

    def _reset_parameters(self):
        xavier_init_(self)

    def encode(self, src, pos, key_padding_mask):
        """
        Args:
            src (Tensor): (B, S, d) projected, flattened feature map.
            pos (Tensor): (B, S, d) spatial positional encoding.
            key_padding_mask (Tensor): (B, S) bool, True on padding.

        Returns:
            Tensor: (B, S, d) memory.
        """
        return self.encoder(src, pos=pos, key_padding_mask=key_padding_mask)

    def decode(
        self,
        tgt,
        memory,
        pos,
        query_pos,
        memory_key_padding_mask,
        self_attn_mask=None,
        need_weights: bool = False,
    ):
        """
        Args:
            tgt (Tensor): (B, N, d) query content (zeros for DETR's learned queries).
            memory (Tensor): (B, S, d) encoder output.
            pos (Tensor): (B, S, d) spatial positional encoding.
            query_pos (Tensor): (B, N, d) query positional embedding.
            memory_key_padding_mask (Tensor): (B, S) bool, True on padding.
            self_attn_mask (Tensor): optional (N, N) bool, True = blocked.
            need_weights (bool): also return the attention maps of every decoder layer.

        Returns:
            Tensor: (L, B, N, d) every decoder layer's normalised output; with ``need_weights``
            a tuple (that, {"self_attn" (L, B, heads, N, N), "cross_attn" (L, B, heads, N, S)}).
        """
        return self.decoder(
            tgt,
            memory,
            pos=pos,
            query_pos=query_pos,
            memory_key_padding_mask=memory_key_padding_mask,
            self_attn_mask=self_attn_mask,
            need_weights=need_weights,
        )

    def forward(self, src, pos, key_padding_mask, query_pos, tgt=None):
        """Encode then decode; returns (hs (L, B, N, d), memory (B, S, d))."""
        memory = self.encode(src, pos, key_padding_mask)
        tgt = torch.zeros_like(query_pos) if tgt is None else tgt
        return self.decode(tgt, memory, pos, query_pos, key_padding_mask), memory
