# Copyright (c) kd_detr contributors.
"""DINO's encoder-decoder (Zhang et al., ICLR 2023): Deformable DETR's encoder and decoder layers,
with DAB-style positional queries recomputed from the current reference box in every layer and
"look forward twice" box refinement.

* :class:`DINODecoder`: per layer, the positional query is ``ref_point_head(sine(box))`` of the
  layer's input reference box; the output goes through a shared final LayerNorm (``norm``)
  before the heads. After layer i the box head refines the reference; the refined box is the
  next layer's input *detached*, but is returned undetached, so that layer i + 1's prediction
  (built on it) also trains layer i (look forward twice).
* :class:`DINOTransformer`: :class:`DeformableTransformer` with that decoder.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from detectron2.config import configurable

from .build import TRANSFORMER_REGISTRY
from .dab_transformer import box_sine_embedding, inverse_sigmoid
from .deformable_transformer import DeformableTransformer
from .layers import MLP, stack_attention_maps

__all__ = ["DINODecoder", "DINOTransformer"]


class DINODecoder(nn.Module):
    """Deformable decoder layers with per-layer positional queries and look-forward-twice.

    Args:
        layers (list[DeformableDecoderLayer], see :mod:`.deformable_transformer`): the L layers.
        d_model (int): d.
        inverse_sigmoid_eps (float): clamp of ``inverse_sigmoid`` in the refinement.
        look_forward_twice (bool): return the undetached refined references (DINO); False
            returns the detached ones (Deformable DETR's "look forward once").
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        d_model: int,
        inverse_sigmoid_eps: float = 1e-5,
        look_forward_twice: bool = True,
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.look_forward_twice = look_forward_twice

    def forward(
        self,
        tgt,
        boxes,
        memory,
        spatial_shapes,
        ratios,
        padding_mask,
        box_heads: Sequence[nn.Module],
        self_attn_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ):
        """
        Args:
            tgt (Tensor): (B, N, d) initial content queries.
            boxes (Tensor): (B, N, 4) initial reference boxes, cxcywh in [0, 1] of the unpadded
                image (detached by the caller when they come from the encoder).
            memory, spatial_shapes, ratios, padding_mask: see :meth:`DeformableEncoder.forward`.
            box_heads: L heads giving (B, N, 4) offsets of ``inverse_sigmoid(reference)``.
            self_attn_mask (Tensor): optional (N, N) or (B, N, N) bool, True = blocked.
            need_weights (bool): also return every layer's attention maps.

        Returns:
            tuple[Tensor, Tensor]: normalised outputs (L, B, N, d) and the references (L, B, N, 4)
            each layer's prediction is built on: the initial boxes for layer 0, then the refined
            boxes of the previous layer, undetached with look-forward-twice (their values equal
            the detached boxes the next layer's attention used); with ``need_weights`` a third
            entry, {"self_attn" (L, B, heads, N, N), "cross_attn" (L, B, heads, N, S)} (see
            :meth:`.deformable_transformer.DeformableDecoderLayer.forward`).
        """
        if len(box_heads) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} box heads, got {len(box_heads)}")
        scale = torch.cat([ratios, ratios], -1)[:, None]  # (B, 1, L, 4)
        outputs, references, maps = [], [], []
        for i, (layer, head) in enumerate(zip(self.layers, box_heads)):
            references.append(boxes)
            boxes = boxes.detach()  # the layer itself only sees a detached reference
            reference = boxes[:, :, None] * scale  # (B, N, L, 4)
            # DINO embeds the reference scaled by the first level's valid ratio.
            sine = box_sine_embedding(reference[:, :, 0], self.d_model // 2)
            query_pos = self.ref_point_head(sine)
            args = (
                tgt, query_pos, reference, memory, spatial_shapes, padding_mask, None,
                self_attn_mask,
            )  # fmt: skip
            if need_weights:
                tgt, *weights = layer(*args, need_weights=True)
                maps.append(weights)
            else:
                tgt = layer(*args)
            outputs.append(self.norm(tgt))
            if i < len(self.layers) - 1:
                # Refinement from the un-normalised output, as the official code.
                refined = (head(tgt) + inverse_sigmoid(boxes, self.inverse_sigmoid_eps)).sigmoid()
                boxes = refined if self.look_forward_twice else refined.detach()
        if need_weights:
            return torch.stack(outputs), torch.stack(references), stack_attention_maps(maps)
        return torch.stack(outputs), torch.stack(references)


@TRANSFORMER_REGISTRY.register()
class DINOTransformer(DeformableTransformer):
    """:class:`DeformableTransformer` (level embeddings, deformable encoder) with a
    :class:`DINODecoder`; ``decode(tgt, boxes, encoded, box_heads, self_attn_mask,
    need_weights)``.

    Args:
        look_forward_twice (bool): see :class:`DINODecoder`.
        kwargs: as :class:`DeformableTransformer`.
    """

    @configurable
    def __init__(self, *, look_forward_twice: bool = True, **kwargs):
        super().__init__(**kwargs)
        old = self.decoder
        self.decoder = DINODecoder(
            list(old.layers), self.d_model, old.inverse_sigmoid_eps, look_forward_twice
        )
        nn.init.xavier_uniform_(self.decoder.ref_point_head.layers[0].weight)
        nn.init.xavier_uniform_(self.decoder.ref_point_head.layers[1].weight)

    @classmethod
    def from_config(cls, cfg):
        return {
            **DeformableTransformer.from_config(cfg),
            "look_forward_twice": cfg.MODEL.DETR.DINO.LOOK_FORWARD_TWICE,
        }

    def decode(self, tgt, boxes, encoded, box_heads, self_attn_mask=None, need_weights=False):
        """Decode queries against :meth:`encode`'s output; see :meth:`DINODecoder.forward`."""
        return self.decoder(
            tgt,
            boxes,
            encoded["memory"],
            encoded["spatial_shapes"],
            encoded["valid_ratios"],
            encoded["mask"],
            box_heads,
            self_attn_mask,
            need_weights,
        )
