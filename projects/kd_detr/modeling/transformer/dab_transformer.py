# Copyright (c) kd_detr contributors.
"""DAB-DETR's encoder-decoder (Liu et al., ICLR 2022): 4-D anchor boxes as decoder queries.

Every decoder layer turns its reference boxes (cx, cy, w, h) in [0, 1] into a sine embedding and,
through ``ref_point_head``, into the positional query; the cross-attention concatenates, per head,
the content query with the (scaled, width/height-modulated) sine embedding of the box centre.
After each layer the boxes are refined: ``sigmoid(box_head(out) + inverse_sigmoid(boxes))``,
detached before they feed the next layer. Batch-first tensors throughout.
"""
import math
from typing import Optional, Sequence

import torch
from torch import nn

from detectron2.config import configurable

from .build import TRANSFORMER_REGISTRY
from .detr_transformer import TransformerEncoderLayer, transformer_args_from_config, xavier_init_
from .layers import FFN, MLP, multi_head_attention, stack_attention_maps

__all__ = [
    "DABDecoderLayer",
    "DABTransformer",
    "box_sine_embedding",
    "inverse_sigmoid",
]


def inverse_sigmoid(x, eps: float = 1e-3):
    """Logit of ``x`` clamped to [0, 1], with both ``x`` and ``1 - x`` clamped at ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes, num_feats: int = 128, temperature: float = 10000.0):
    """Sine embedding of normalised coordinates, one ``num_feats`` block per coordinate.

    A coordinate ``c`` gives ``sin(2 pi c / T^(2i/F))`` at even channels ``2i`` and ``cos`` of
    the same angle at odd ones. Blocks are ordered (y, x, then the remaining coordinates): a box
    (cx, cy, w, h) gives [y | x | w | h], matching the (y, x) order of the feature-map encoding.

    Args:
        boxes (Tensor): (..., K) coordinates in [0, 1], K >= 2 (cxcywh boxes: K = 4).
        num_feats (int): F, channels per coordinate (even).
        temperature (float): T.

    Returns:
        Tensor: (..., K * F).
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = boxes[..., None] * (2 * math.pi) / dim_t  # (..., K, F)
    emb = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    order = [1, 0] + list(range(2, boxes.shape[-1]))
    return emb[..., order, :].flatten(-2).to(boxes.dtype)


class DABDecoderLayer(nn.Module):
    """Conditional self-attention, conditional cross-attention and FFN, each post-norm.

    Self-attention: queries and keys are content + positional projections, values content only.
    Cross-attention: per head, the query is [content (+ positional in the first layer or with
    ``keep_query_pos``) | projected sine embedding] and the key [memory (+ its positional
    projection, same condition) | positional projection]; widths 2d/heads, values d/heads.

    Args:
        d_model (int): width d.
        nhead (int): attention heads.
        dim_feedforward (int): FFN hidden width.
        dropout (float): dropout on attention weights, residual branches and inside the FFN.
        activation (str): FFN activation (DAB-DETR: "prelu").
        is_first (bool): first decoder layer (always adds the positional query).
        keep_query_pos (bool): add the positional query in every layer's cross-attention.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "prelu",
        is_first: bool = False,
        keep_query_pos: bool = False,
    ):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.use_query_pos = is_first or keep_query_pos
        # self-attention
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn_out_proj = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        # cross-attention
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if self.use_query_pos else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn_out_proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        # feed-forward
        self.ffn = FFN(d_model, dim_feedforward, dropout, activation)
        self.norm3 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def _interleave_heads(self, a, b):
        # (B, N, d) x2 -> (B, N, 2d) with per-head blocks [a_h | b_h]
        bsz, n, d = a.shape
        a = a.view(bsz, n, self.nhead, d // self.nhead)
        b = b.view(bsz, n, self.nhead, d // self.nhead)
        return torch.cat([a, b], dim=3).view(bsz, n, 2 * d)

    def forward(
        self,
        tgt,
        memory,
        pos,
        query_pos,
        query_sine_embed,
        memory_key_padding_mask=None,
        self_attn_mask=None,
        need_weights: bool = False,
    ):
        """
        Args:
            tgt (Tensor): (B, N, d) query content.
            memory (Tensor): (B, S, d) encoder output.
            pos (Tensor): (B, S, d) spatial positional encoding of the memory.
            query_pos (Tensor): (B, N, d) positional query (``ref_point_head`` of the boxes).
            query_sine_embed (Tensor): (B, N, d) scaled and modulated (y, x) sine embedding.
            memory_key_padding_mask (Tensor): (B, S) bool, True on padding.
            self_attn_mask (Tensor): (N, N) or (B, N, N) bool, True where query i may not
                attend to query j.
            need_weights (bool): also return both attentions' weights (computed next to
                the fused kernel, which still gives the output; distillation of attention maps).

        Returns:
            Tensor: (B, N, d); with ``need_weights`` a tuple (output, self-attention weights
            (B, heads, N, N), cross-attention weights (B, heads, N, S)).
        """
        attn_drop = self.dropout if self.training else 0.0
        weights = []

        def attend(*args, **kwargs):
            if not need_weights:
                return multi_head_attention(*args, **kwargs)
            out, w = multi_head_attention(*args, need_weights=True, **kwargs)
            weights.append(w)
            return out

        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        out = attend(
            q, k, self.sa_v_proj(tgt), self.nhead, attn_mask=self_attn_mask, dropout=attn_drop
        )
        tgt = self.norm1(tgt + self.drop(self.self_attn_out_proj(out)))

        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.use_query_pos:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = self._interleave_heads(q, self.ca_qpos_sine_proj(query_sine_embed))
        k = self._interleave_heads(k, k_pos)
        out = attend(
            q,
            k,
            self.ca_v_proj(memory),
            self.nhead,
            key_padding_mask=memory_key_padding_mask,
            dropout=attn_drop,
        )
        tgt = self.norm2(tgt + self.drop(self.cross_attn_out_proj(out)))
        tgt = self.norm3(tgt + self.drop(self.ffn(tgt)))
        return (tgt, *weights) if need_weights else tgt


class DABDecoder(nn.Module):
    """Decoder layers plus DAB-DETR's anchor machinery.

    Args:
        layers (list[DABDecoderLayer]): the L layers.
        d_model (int): width d.
        modulate_hw_attn (bool): scale the x (y) part of the sine embedding by a predicted
            width (height) over the anchor's width (height).
        inverse_sigmoid_eps (float): clamp of :func:`inverse_sigmoid` in the box refinement.
    """

    def __init__(
        self,
        layers,
        d_model: int,
        modulate_hw_attn: bool = True,
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        self.inverse_sigmoid_eps = inverse_sigmoid_eps

    def box_embedding(self, boxes):
        """(..., 4) cxcywh boxes in [0, 1] -> (..., 2d) sine embedding [y | x | w | h]."""
        return box_sine_embedding(boxes, self.d_model // 2)

    def forward(
        self,
        tgt,
        memory,
        pos,
        memory_key_padding_mask,
        boxes,
        box_heads,
        self_attn_mask=None,
        need_weights: bool = False,
    ):
        """
        Args:
            tgt (Tensor): (B, N, d) initial query content.
            memory, pos, memory_key_padding_mask: see :meth:`DABDecoderLayer.forward`.
            boxes (Tensor): (B, N, 4) initial anchor boxes, cxcywh in [0, 1].
            box_heads (Sequence[nn.Module]): per layer, the box head giving (B, N, 4) deltas from
                the layer output (before the final LayerNorm) for the iterative refinement.
            self_attn_mask (Tensor): optional (N, N) bool, True = blocked.
            need_weights (bool): also return every layer's attention maps.

        Returns:
            tuple[Tensor, Tensor]: every layer's output after the final LayerNorm (L, B, N, d),
            and every layer's *input* reference boxes (L, B, N, 4) (the first is ``boxes``);
            with ``need_weights`` a third entry, {"self_attn" (L, B, heads, N, N),
            "cross_attn" (L, B, heads, N, S)}.
        """
        d = self.d_model
        outputs, references, maps = [], [], []
        for i, layer in enumerate(self.layers):
            references.append(boxes)
            sine = self.box_embedding(boxes)  # (B, N, 2d)
            query_pos = self.ref_point_head(sine)
            query_sine = sine[..., :d]
            if i > 0:
                query_sine = query_sine * self.query_scale(tgt)
            if self.ref_anchor_head is not None:
                ref_hw = self.ref_anchor_head(tgt).sigmoid()  # (B, N, 2) as (w, h)
                query_sine = torch.cat(
                    [
                        query_sine[..., : d // 2] * (ref_hw[..., 1] / boxes[..., 3])[..., None],
                        query_sine[..., d // 2 :] * (ref_hw[..., 0] / boxes[..., 2])[..., None],
                    ],
                    dim=-1,
                )
            args = (memory, pos, query_pos, query_sine, memory_key_padding_mask, self_attn_mask)
            if need_weights:
                tgt, *weights = layer(tgt, *args, need_weights=True)
                maps.append(weights)
            else:
                tgt = layer(tgt, *args)
            outputs.append(self.norm(tgt))
            if i < len(self.layers) - 1:
                delta = box_heads[i](tgt)
                boxes = (delta + inverse_sigmoid(boxes, self.inverse_sigmoid_eps)).sigmoid()
                boxes = boxes.detach()
        if need_weights:
            return torch.stack(outputs), torch.stack(references), stack_attention_maps(maps)
        return torch.stack(outputs), torch.stack(references)


@TRANSFORMER_REGISTRY.register()
class DABTransformer(nn.Module):
    """DAB-DETR's transformer: ``encode`` the feature map once, ``decode`` any anchor-box queries.

    The encoder is DETR's post-norm encoder whose positional encoding is rescaled per token and
    layer by ``query_scale(x)`` (an MLP of the current features). Beyond the registry contract,
    ``decode`` also returns every layer's input anchors, and takes the box heads used for the
    refinement (they belong to the meta-architecture). Anchors need w, h > 0 (width/height
    modulation divides by them).

    Args:
        d_model (int): width d.
        nhead (int): attention heads.
        num_encoder_layers (int): encoder depth.
        num_decoder_layers (int): decoder depth L.
        dim_feedforward (int): FFN hidden width.
        dropout (float): dropout rate.
        activation (str): FFN activation.
        keep_query_pos (bool): see :class:`DABDecoderLayer`.
        modulate_hw_attn (bool): see :class:`DABDecoder`.
        inverse_sigmoid_eps (float): see :class:`DABDecoder`.
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
        dropout: float = 0.0,
        activation: str = "prelu",
        keep_query_pos: bool = False,
        modulate_hw_attn: bool = True,
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"DABTransformer: d_model must be even, got {d_model}")
        enc_args = (d_model, nhead, dim_feedforward, dropout, activation)
        self.encoder_layers = nn.ModuleList(
            TransformerEncoderLayer(*enc_args) for _ in range(num_encoder_layers)
        )
        self.encoder_query_scale = MLP(d_model, d_model, d_model, 2)
        layers = [
            DABDecoderLayer(*enc_args, is_first=i == 0, keep_query_pos=keep_query_pos)
            for i in range(num_decoder_layers)
        ]
        self.decoder = DABDecoder(layers, d_model, modulate_hw_attn, inverse_sigmoid_eps)
        self.d_model = d_model
        self.nhead = nhead
        self.num_decoder_layers = num_decoder_layers
        xavier_init_(self)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        return {
            **transformer_args_from_config(cfg),
            "keep_query_pos": d.DAB.KEEP_QUERY_POS,
            "modulate_hw_attn": d.DAB.MODULATE_HW_ATTN,
            "inverse_sigmoid_eps": d.DAB.INVERSE_SIGMOID_EPS,
        }

    def encode(self, src, pos, key_padding_mask):
        """(B, S, d) memory of the flattened feature map; arguments as
        :meth:`DETRTransformer.encode` (``pos`` is rescaled per layer, see the class docstring)."""
        for layer in self.encoder_layers:
            scaled_pos = pos * self.encoder_query_scale(src)
            src = layer(src, pos=scaled_pos, key_padding_mask=key_padding_mask)
        return src

    def decode(
        self,
        tgt,
        memory,
        pos,
        memory_key_padding_mask,
        boxes,
        box_heads: Sequence[nn.Module],
        self_attn_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ):
        """Decode anchor-box queries; see :meth:`DABDecoder.forward`.

        Returns:
            tuple[Tensor, Tensor]: hidden states (L, B, N, d) and input reference boxes
            (L, B, N, 4); with ``need_weights`` also the attention maps (a dict, see
            :meth:`DABDecoder.forward`).
        """
        args = (tgt, memory, pos, memory_key_padding_mask, boxes, box_heads, self_attn_mask)
        if need_weights:
            return self.decoder(*args, need_weights=True)
        return self.decoder(*args)

    def positional_queries(self, boxes):
        """Positional queries of anchor boxes, ``ref_point_head(PE(boxes))``, as the decoder
        computes them for its first layer (KD: turning boxes into this model's queries).

        Args:
            boxes (Tensor): (..., 4) cxcywh in [0, 1].

        Returns:
            Tensor: (..., d).
        """
        return self.decoder.ref_point_head(self.decoder.box_embedding(boxes))
