# Copyright (c) kd_detr contributors.
"""Deformable DETR's encoder-decoder (Zhu et al., ICLR 2021), batch-first, post-norm.

* :class:`DeformableEncoder`: multi-scale deformable self-attention over the flattened levels,
  each token attending around its own position.
* :class:`DeformableDecoder`: self-attention among queries (optionally masked, e.g. to keep
  query groups apart), deformable cross-attention around each query's reference, FFN. References
  are (B, N, 4) boxes (cx, cy, w, h) in [0, 1]; rows flagged in ``point_mask`` are 2-d points
  whose w, h are ignored (standard single-stage queries). Given box heads, the references are
  refined after every layer (iterative box refinement) and turn into boxes.
* :class:`DeformableTransformer`: level embeddings + encoder + decoder; query selection (learned
  queries, two-stage proposals) belongs to the meta-architecture (:mod:`.query_selection`).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable

from .build import TRANSFORMER_REGISTRY
from .dab_transformer import inverse_sigmoid
from .detr_transformer import transformer_args_from_config
from .layers import FFN, MultiheadAttention, stack_attention_maps
from .ms_deform_attn import MSDeformAttn

__all__ = [
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableTransformer",
    "encoder_reference_points",
    "reference_logits",
    "valid_ratios",
]


def valid_ratios(mask) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2) unpadded fraction of the width and height."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / height
    valid_w = (~mask[:, 0, :]).sum(1).float() / width
    return torch.stack([valid_w, valid_h], -1)


def encoder_reference_points(spatial_shapes, ratios) -> torch.Tensor:
    """Cell centres of every level as encoder reference points.

    Args:
        spatial_shapes: L pairs (h_l, w_l).
        ratios (Tensor): (B, L, 2) valid ratios (w, h) of every level.

    Returns:
        Tensor: (B, S, L, 2) (x, y): each token's centre normalised by its level's unpadded
        size, then mapped onto every level's padded map.
    """
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=ratios.dtype, device=ratios.device),
            torch.linspace(0.5, w - 0.5, w, dtype=ratios.dtype, device=ratios.device),
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((xs, ys), -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


def reference_logits(boxes, point_mask: Optional[torch.Tensor] = None, eps: float = 1e-5):
    """Box-head offsets are added to these logits: ``inverse_sigmoid(boxes)``, with 0 for the
    w, h of rows flagged as points (the head then predicts w, h directly).

    Args:
        boxes (Tensor): (..., N, 4) references.
        point_mask (Tensor): optional (N,) bool.
    """
    logits = inverse_sigmoid(boxes, eps)
    if point_mask is None:
        return logits
    wh = logits[..., 2:].masked_fill(point_mask[:, None], 0.0)
    return torch.cat([logits[..., :2], wh], -1)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, each with a residual and a post LayerNorm."""

    def __init__(
        self, d_model, nhead, dim_feedforward, dropout, activation, n_levels, n_points, kernel
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, nhead, n_points, kernel)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_feedforward, dropout, activation)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        """(B, S, d) -> (B, S, d); ``reference_points`` (B, S, L, 2), ``padding_mask`` (B, S)."""
        out = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(out))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer`."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, pos, spatial_shapes, ratios, padding_mask):
        """
        Args:
            src (Tensor): (B, S, d) flattened projected levels.
            pos (Tensor): (B, S, d) positional + level embeddings.
            spatial_shapes: L pairs (h_l, w_l).
            ratios (Tensor): (B, L, 2) valid ratios.
            padding_mask (Tensor): (B, S) bool, True on padding.

        Returns:
            Tensor: (B, S, d) memory.
        """
        refs = encoder_reference_points(spatial_shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, refs, spatial_shapes, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention (position added to queries and keys), deformable cross-attention to the
    memory, FFN; each with a residual and a post LayerNorm."""

    def __init__(
        self, d_model, nhead, dim_feedforward, dropout, activation, n_levels, n_points, kernel
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, nhead, n_points, kernel)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_feedforward, dropout, activation)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt,
        query_pos,
        reference,
        memory,
        spatial_shapes,
        padding_mask,
        point_mask=None,
        self_attn_mask=None,
        need_weights: bool = False,
    ):
        """
        Args:
            tgt (Tensor): (B, N, d) content; ``query_pos`` (B, N, d) positional queries.
            reference (Tensor): (B, N, L, 4) references on every level (see :class:`MSDeformAttn`).
            memory (Tensor): (B, S, d); ``padding_mask`` (B, S) True on padding.
            point_mask (Tensor): optional (N,) bool, rows of ``reference`` that are points.
            self_attn_mask (Tensor): optional (N, N) bool, True = blocked.
            need_weights (bool): also return the self-attention weights (B, heads, N, N) and the
                cross-attention map over the memory tokens (B, heads, N, S) (the sampling
                weights scattered onto the token grid, see
                :func:`~.ms_deform_attn.sampling_attention_map`), computed next to the fused
                paths: the output is the same, bit for bit.

        Returns:
            Tensor: (B, N, d); with ``need_weights`` a tuple (output, self-attention weights,
            cross-attention map).
        """
        q = k = tgt + query_pos
        if need_weights:
            out, self_weights = self.self_attn(q, k, tgt, attn_mask=self_attn_mask,
                                               need_weights=True)  # fmt: skip
        else:
            out = self.self_attn(q, k, tgt, attn_mask=self_attn_mask)
        tgt = self.norm1(tgt + self.dropout1(out))
        out = self.cross_attn(
            tgt + query_pos, reference, memory, spatial_shapes, padding_mask, point_mask,
            need_weights,
        )  # fmt: skip
        if need_weights:
            out, cross_map = out
        tgt = self.norm2(tgt + self.dropout2(out))
        tgt = self.norm3(tgt + self.dropout3(self.ffn(tgt)))
        return (tgt, self_weights, cross_map) if need_weights else tgt


class DeformableDecoder(nn.Module):
    """Decoder layers; every layer's output is returned as is (no final LayerNorm)."""

    def __init__(self, layers, inverse_sigmoid_eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.inverse_sigmoid_eps = inverse_sigmoid_eps

    def forward(
        self,
        tgt,
        query_pos,
        boxes,
        memory,
        spatial_shapes,
        ratios,
        padding_mask,
        point_mask: Optional[torch.Tensor] = None,
        box_heads: Optional[Sequence[nn.Module]] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ):
        """
        Args:
            tgt, query_pos (Tensor): (B, N, d) initial content and positional queries.
            boxes (Tensor): (B, N, 4) initial references, cxcywh in [0, 1] of the unpadded image.
            memory, spatial_shapes, ratios, padding_mask: see :meth:`DeformableEncoder.forward`.
            point_mask (Tensor): optional (N,) bool, True where ``boxes`` rows are 2-d points.
            box_heads: per layer, a head giving (B, N, 4) offsets of the reference logits
                (:func:`reference_logits`) from the layer output; None: no refinement.
            self_attn_mask (Tensor): optional (N, N) bool, True = blocked.
            need_weights (bool): also return every layer's attention maps.

        Returns:
            tuple: outputs (L, B, N, d), input references (L, B, N, 4) of every layer, and
            (L, N) bool point masks of those references (all False once refined); with
            ``need_weights`` a fourth entry, {"self_attn" (L, B, heads, N, N), "cross_attn"
            (L, B, heads, N, S)} (:func:`~.layers.stack_attention_maps`).
        """
        n = boxes.shape[1]
        no_points = torch.zeros(n, dtype=torch.bool, device=boxes.device)
        point_mask = no_points if point_mask is None else point_mask
        scale = torch.cat([ratios, ratios], -1)[:, None]  # (B, 1, L, 4)
        outputs, references, masks, maps = [], [], [], []
        for i, layer in enumerate(self.layers):
            references.append(boxes)
            masks.append(point_mask)
            reference = boxes[:, :, None] * scale
            args = (
                tgt, query_pos, reference, memory, spatial_shapes, padding_mask,
                point_mask if point_mask.any() else None, self_attn_mask,
            )  # fmt: skip
            if need_weights:
                tgt, *weights = layer(*args, need_weights=True)
                maps.append(weights)
            else:
                tgt = layer(*args)
            outputs.append(tgt)
            if box_heads is not None and i < len(self.layers) - 1:
                logits = reference_logits(boxes, point_mask, self.inverse_sigmoid_eps)
                boxes = (box_heads[i](tgt) + logits).sigmoid().detach()
                point_mask = no_points
        decoded = torch.stack(outputs), torch.stack(references), torch.stack(masks)
        return (*decoded, stack_attention_maps(maps)) if need_weights else decoded


@TRANSFORMER_REGISTRY.register()
class DeformableTransformer(nn.Module):
    """Level embeddings, :class:`DeformableEncoder` and :class:`DeformableDecoder`.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
            activation: as :class:`DETRTransformer` (post-norm only).
        num_feature_levels (int): L.
        enc_n_points, dec_n_points (int): sampling points per head and level.
        attn_kernel (str): deformable-attention kernel (see ``ms_deform_attn.select_kernel``).
        inverse_sigmoid_eps (float): clamp of ``inverse_sigmoid`` in the box refinement.
    """

    @configurable
    def __init__(
        self,
        *,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        attn_kernel: str = "auto",
        inverse_sigmoid_eps: float = 1e-5,
    ):
        super().__init__()
        common = (d_model, nhead, dim_feedforward, dropout, activation, num_feature_levels)
        self.encoder = DeformableEncoder(
            DeformableEncoderLayer(*common, enc_n_points, attn_kernel)
            for _ in range(num_encoder_layers)
        )
        self.decoder = DeformableDecoder(
            [
                DeformableDecoderLayer(*common, dec_n_points, attn_kernel)
                for _ in range(num_decoder_layers)
            ],
            inverse_sigmoid_eps,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.d_model = d_model
        self.nhead = nhead
        self.num_decoder_layers = num_decoder_layers
        self.num_feature_levels = num_feature_levels
        self._reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        if d.PRE_NORM:
            raise ValueError("DeformableTransformer is post-norm: set MODEL.DETR.PRE_NORM False")
        f = d.DEFORMABLE
        return {
            **transformer_args_from_config(cfg),
            "num_feature_levels": f.NUM_FEATURE_LEVELS,
            "enc_n_points": f.ENC_N_POINTS,
            "dec_n_points": f.DEC_N_POINTS,
            "attn_kernel": f.ATTN_KERNEL,
            "inverse_sigmoid_eps": f.INVERSE_SIGMOID_EPS,
        }

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def flatten(self, srcs, masks, pos) -> Dict:
        """Flatten L levels into one sequence.

        Args:
            srcs (list[Tensor]): L projected maps (B, d, h_l, w_l).
            masks (list[Tensor]): L padding masks (B, h_l, w_l), True on padding.
            pos (list[Tensor]): L positional encodings (B, d, h_l, w_l).

        Returns:
            dict: "src" (B, S, d), "pos" (B, S, d) with level embeddings added, "mask" (B, S),
            "spatial_shapes" (list of (h_l, w_l)), "valid_ratios" (B, L, 2).
        """
        if len(srcs) != self.num_feature_levels:
            raise ValueError(
                f"DeformableTransformer has {self.num_feature_levels} levels "
                f"(MODEL.DETR.DEFORMABLE.NUM_FEATURE_LEVELS) but got {len(srcs)} feature maps"
            )
        shapes: List[Tuple[int, int]] = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i] for i, p in enumerate(pos)], 1
        )
        return {
            "src": src,
            "pos": pos,
            "mask": torch.cat([m.flatten(1) for m in masks], 1),
            "spatial_shapes": shapes,
            "valid_ratios": torch.stack([valid_ratios(m) for m in masks], 1).to(src.dtype),
        }

    def encode(self, srcs, masks, pos) -> Dict:
        """:meth:`flatten` the levels and run the encoder; returns the :meth:`flatten` dict
        plus "memory" (B, S, d)."""
        flat = self.flatten(srcs, masks, pos)
        flat["memory"] = self.encoder(
            flat["src"], flat["pos"], flat["spatial_shapes"], flat["valid_ratios"], flat["mask"]
        )
        return flat

    def decode(self, tgt, query_pos, boxes, encoded: Dict, **kwargs):
        """Decode queries against :meth:`encode`'s output; ``kwargs`` (point_mask, box_heads,
        self_attn_mask, need_weights) and the result as :meth:`DeformableDecoder.forward`."""
        return self.decoder(
            tgt,
            query_pos,
            boxes,
            encoded["memory"],
            encoded["spatial_shapes"],
            encoded["valid_ratios"],
            encoded["mask"],
            **kwargs,
        )
