# Copyright (c) kd_detr contributors.
"""DAB-DETR (Liu et al., ICLR 2022) as a Detectron2 meta-architecture.

It shares DETR's preprocessing, encoder call, losses and inference (:class:`DETR`) and replaces
the learned positional queries by learned 4-D anchor boxes refined layer by layer.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..denoising import (
    DenoisingGenerator,
    DenoisingQueries,
    denoising_args_from_config,
    denoising_loss_key,
)
from ..query_groups import block_diagonal_mask, check_box_group, joint_query_pass
from ..transformer import MLP, split_attention_maps
from ..transformer.dab_transformer import inverse_sigmoid
from .denoising_forward import DenoisingForwardMixin
from .detr import DETR, ImagesLike

__all__ = ["DABDETR", "block_diagonal_mask"]  # the mask lives in ..query_groups


@META_ARCH_REGISTRY.register()
class DABDETR(DenoisingForwardMixin, DETR):
    """DAB-DETR: DETR whose decoder queries are anchor boxes (cx, cy, w, h) refined per layer.

    Detection queries are ``NUM_QUERIES`` learned anchors (``refpoint_embed``, stored before the
    sigmoid) with zero content, or ``NUM_PATTERNS`` learned content patterns per anchor. Boxes of
    layer l are ``sigmoid(bbox_embed(h_l) + inverse_sigmoid(b_l))`` where ``b_l`` is the layer's
    input anchor; classification is sigmoid (focal loss, focal matching cost) over C classes.

    Extra query groups (distillation) are dicts ``{"boxes": (B or 1, M, 4) cxcywh in [0, 1],
    "content": optional (B or 1, M, d)}``; a leading 1 is shared by all images and absent
    content is zeros (the content of DAB-DETR's own queries without patterns). A group's boxes
    are its anchors: they go through this model's sine embedding, ``ref_point_head`` and
    iterative refinement exactly like the detection anchors. Groups never attend to the
    detection queries or to each other (separate passes or a block-diagonal mask, see
    ``MODEL.DETR.GROUP_DECODING``), so detection outputs and losses do not depend on them.
    """

    @configurable
    def __init__(
        self,
        *,
        num_patterns: int = 0,
        random_refpoints_xy: bool = False,
        bbox_embed_diff_each_layer: bool = False,
        inverse_sigmoid_eps: float = 1e-3,
        denoising: Optional[DenoisingGenerator] = None,
        **kwargs,
    ):
        """
        Args:
            num_patterns: learned content patterns (0: zero content queries).
            random_refpoints_xy: initialise anchor centres uniformly in [0, 1].
            bbox_embed_diff_each_layer: one box head per decoder layer.
            inverse_sigmoid_eps: clamp of :func:`inverse_sigmoid` in box predictions.
            denoising: DN-DETR training (``MODEL.DETR.DN``); its label embedding also gives the
                detection queries' content (the "no object" embedding, as DN-DAB-DETR).
            kwargs: arguments of :class:`DETR`; ``transformer`` must be a DABTransformer and
                ``criterion`` must use the focal loss.
        """
        super().__init__(**kwargs)
        if not self.use_focal:
            raise ValueError(
                "DABDETR uses the sigmoid focal loss: set MODEL.DETR.USE_FOCAL_LOSS True"
            )
        if not hasattr(self.transformer, "positional_queries"):
            raise TypeError(
                f"DABDETR needs a DABTransformer (MODEL.DETR.TRANSFORMER_NAME), got "
                f"{type(self.transformer).__name__}"
            )
        hidden_dim = self.transformer.d_model
        num_layers = self.transformer.num_decoder_layers
        self.refpoint_embed = nn.Embedding(self.num_queries, 4)
        if random_refpoints_xy:
            with torch.no_grad():
                xy = torch.rand_like(self.refpoint_embed.weight[:, :2])
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(xy, inverse_sigmoid_eps)
        self.num_patterns = num_patterns
        self.patterns = nn.Embedding(num_patterns, hidden_dim) if num_patterns > 0 else None
        self.bbox_embed_diff_each_layer = bbox_embed_diff_each_layer
        if bbox_embed_diff_each_layer:
            self.bbox_embed = nn.ModuleList(
                MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers)
            )
        heads = self.bbox_embed if bbox_embed_diff_each_layer else [self.bbox_embed]
        with torch.no_grad():
            for head in heads:
                head.layers[-1].weight.zero_()
                head.layers[-1].bias.zero_()
            if isinstance(self.class_embed, nn.Linear):  # an open-vocabulary head sets its own
                self.class_embed.bias.fill_(-math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        if denoising is not None and num_patterns > 0:
            raise ValueError(
                "MODEL.DETR.DN.ENABLED does not support content patterns: set "
                "MODEL.DETR.DAB.NUM_PATTERNS 0"
            )
        self.denoising = denoising

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        if d.DAB.QUERY_DIM != 4:
            raise ValueError(f"MODEL.DETR.DAB.QUERY_DIM must be 4, got {d.DAB.QUERY_DIM}")
        if d.PRE_NORM:
            raise ValueError("DABDETR has post-norm layers only: set MODEL.DETR.PRE_NORM False")
        ret = super().from_config(cfg)
        ret.update(
            position_temperature=d.DAB.TEMPERATURE,
            num_patterns=d.DAB.NUM_PATTERNS,
            random_refpoints_xy=d.DAB.RANDOM_REFPOINTS_XY,
            bbox_embed_diff_each_layer=d.DAB.BBOX_EMBED_DIFF_EACH_LAYER,
            inverse_sigmoid_eps=d.DAB.INVERSE_SIGMOID_EPS,
        )
        if d.DN.ENABLED:
            dn_args = denoising_args_from_config(cfg)
            ret["denoising"] = DenoisingGenerator(d.NUM_CLASSES, d.HIDDEN_DIM, **dn_args)
            weights = ret["criterion"].weight_dict
            weights.update({denoising_loss_key(k): v for k, v in list(weights.items())})
        return ret

    # ---------------------------------------------------------------- queries and heads
    def _build_detection_queries(self, hidden_dim: int) -> None:
        """No DETR positional queries: the anchors (``refpoint_embed``) and content patterns are
        created by :meth:`__init__` once its arguments are set, after the heads."""

    def _box_heads(self):
        if self.bbox_embed_diff_each_layer:
            return list(self.bbox_embed)
        return [self.bbox_embed] * self.transformer.num_decoder_layers

    box_query_groups = True

    def detection_query_content(self, batch_size: int, outputs: Dict) -> torch.Tensor:
        """(B, N, d) content of the detection queries: zeros, the patterns or, with denoising,
        the "no object" label embedding (see :meth:`detection_queries`)."""
        return self.detection_queries(batch_size)[0]

    def detection_queries(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Content (B, N, d) and anchor boxes (B, N, 4) of the detection queries.

        N = Q, or P * Q with P patterns: query ``p * Q + q`` has pattern p and anchor q. Content
        is zeros, the patterns, or with denoising the "no object" label embedding.
        """
        boxes = self.refpoint_embed.weight.sigmoid()  # (Q, 4)
        if self.denoising is not None:
            content = self.denoising.matching_content(boxes.shape[0])
        elif self.patterns is None:
            content = boxes.new_zeros(boxes.shape[0], self.transformer.d_model)
        else:
            content = self.patterns.weight.repeat_interleave(boxes.shape[0], dim=0)
            boxes = boxes.repeat(self.num_patterns, 1)
        return (
            content[None].expand(batch_size, -1, -1),
            boxes[None].expand(batch_size, -1, -1),
        )

    def predict(self, hs, reference_boxes) -> Tuple[torch.Tensor, torch.Tensor]:
        """Heads of every layer.

        Args:
            hs (Tensor): (L, B, N, d) normalised decoder outputs.
            reference_boxes (Tensor): (L, B, N, 4) every layer's input anchors.

        Returns:
            tuple[Tensor, Tensor]: logits (L, B, N, C) and cxcywh boxes (L, B, N, 4) in [0, 1].
        """
        if self.bbox_embed_diff_each_layer:
            deltas = torch.stack([head(h) for head, h in zip(self.bbox_embed, hs)])
        else:
            deltas = self.bbox_embed(hs)
        boxes = (deltas + inverse_sigmoid(reference_boxes, self.inverse_sigmoid_eps)).sigmoid()
        return self.class_embed(hs), boxes

    def _decode_all(self, encoded, sets, denoising=None):
        """:meth:`decode` or, with denoising queries, :meth:`decode_with_denoising`, as
        ``(per-set outputs, denoising outputs or None)``."""
        if denoising is None:
            return self.decode(encoded, sets), None
        return self.decode_with_denoising(encoded, sets, denoising)

    def decode(self, encoded, queries: List[Tuple[torch.Tensor, torch.Tensor]]):
        """Decode query sets that do not attend to each other.

        Args:
            encoded (dict): output of :meth:`encode`.
            queries: list of (content (B, N_i, d), anchor boxes (B, N_i, 4)).

        Returns:
            list[tuple[Tensor, Tensor]]: per set, hidden states (L, B, N_i, d) and input
            reference boxes (L, B, N_i, 4); with ``keep_attention_maps`` a third entry, the
            set's attention maps (see :meth:`DETR.decode`).
        """
        args = (encoded["memory"], encoded["pos"], encoded["mask"])
        heads = self._box_heads()
        need = self.keep_attention_maps
        if self.group_decoding == "separate" or len(queries) == 1:
            if need:
                return [
                    self.transformer.decode(c, *args, b, heads, need_weights=True)
                    for c, b in queries
                ]
            return [self.transformer.decode(c, *args, b, heads) for c, b in queries]
        sizes = [c.shape[1] for c, _ in queries]
        content = torch.cat([c for c, _ in queries], dim=1)
        boxes = torch.cat([b for _, b in queries], dim=1)
        mask = block_diagonal_mask(sizes, self.device)
        if need:
            hs, refs, maps = self.transformer.decode(
                content, *args, boxes, heads, self_attn_mask=mask, need_weights=True
            )
            parts = zip(hs.split(sizes, dim=2), refs.split(sizes, dim=2))
            return [(*p, m) for p, m in zip(parts, split_attention_maps(maps, sizes))]
        hs, refs = self.transformer.decode(content, *args, boxes, heads, self_attn_mask=mask)
        return list(zip(hs.split(sizes, dim=2), refs.split(sizes, dim=2)))

    def _parse_groups(self, groups, batch_size):
        """Validate extra query groups; returns [(content (B, M, d), boxes (B, M, 4))]."""
        d = self.transformer.d_model
        parsed = []
        for g, group in enumerate(groups):
            boxes, content = check_box_group(group, g, batch_size, d, "DABDETR")
            shape = (batch_size, boxes.shape[1], d)
            if content is None:
                content = self._default_group_content(boxes.shape[1]).to(boxes.dtype).expand(shape)
            boxes = boxes.to(content.dtype).expand(batch_size, -1, -1)
            parsed.append((content, boxes))
        return parsed

    def _default_group_content(self, num: int) -> torch.Tensor:
        """(num, d) content of an extra query group given without one: that of the detection
        queries without patterns (zeros, or the "no object" label embedding with denoising)."""
        if self.denoising is not None:
            return self.denoising.matching_content(num)
        return self.refpoint_embed.weight.new_zeros(num, self.transformer.d_model)

    def decode_with_denoising(self, encoded, queries, denoising: DenoisingQueries):
        """:meth:`decode` with denoising queries prepended to the detection queries (the first
        query set). Their attention mask (:func:`denoising_attention_mask`) lets them see the
        detection queries, and keeps the detection queries, the other groups and the padded
        slots from seeing them. With ``GROUP_DECODING`` "separate" the extra groups get their own
        passes; "masked" decodes everything in one pass.

        Returns:
            tuple: the list of :meth:`decode`, and the denoising queries' (hidden states
            (L, B, N, d), input reference boxes (L, B, N, 4)) (no attention maps).
        """
        args = (encoded["memory"], encoded["pos"], encoded["mask"])
        heads = self._box_heads()
        content, boxes, sizes, mask, num_joint = joint_query_pass(
            queries, self.group_decoding, denoising
        )
        if self.keep_attention_maps:
            hs, refs, maps = self.transformer.decode(
                content, *args, boxes, heads, self_attn_mask=mask, need_weights=True
            )
            parts = list(zip(hs.split(sizes, dim=2), refs.split(sizes, dim=2)))
            own = split_attention_maps(maps, sizes)
            rest = [
                self.transformer.decode(c, *args, b, heads, need_weights=True)
                for c, b in queries[num_joint:]
            ]
            return [(*p, m) for p, m in zip(parts[1:], own[1:])] + rest, parts[0]
        hs, refs = self.transformer.decode(content, *args, boxes, heads, self_attn_mask=mask)
        parts = list(zip(hs.split(sizes, dim=2), refs.split(sizes, dim=2)))
        rest = [self.transformer.decode(c, *args, b, heads) for c, b in queries[num_joint:]]
        return parts[1:] + rest, parts[0]

    def forward_raw(
        self,
        images: ImagesLike,
        extra_query_groups: Optional[List[Dict]] = None,
        denoising: Optional[DenoisingQueries] = None,
    ):
        """Raw outputs of every decoder layer for the detection queries and extra query groups.

        Args:
            images: ImageList of normalised images, or (tensor (B, 3, H, W), mask (B, H, W)).
            extra_query_groups: optional list of dicts {"boxes": (B|1, M, 4) cxcywh in [0, 1],
                "content": optional (B|1, M, d)}.
            denoising: optional denoising queries (training with ``MODEL.DETR.DN``; built from
                the targets by ``self.denoising``).

        Returns:
            dict as :meth:`DETR.forward_raw` (K = C sigmoid logits); "layers" and every entry
            of "groups" also hold "reference_boxes" (L, B, N, 4), each layer's input anchors.
            With ``denoising``, "denoising" holds the same four per-layer tensors for its N
            queries plus "queries" (the :class:`DenoisingQueries`); "layers" and "groups" keep
            the detection queries and extra groups only. With ``keep_attention_maps``,
            "attention_maps" (:meth:`DETR.attention_outputs`; denoising queries left out).
        """
        encoded = self.encode(images)
        bsz = encoded["memory"].shape[0]
        groups = self._parse_groups(extra_query_groups or [], bsz)
        sets = [self.detection_queries(bsz)] + groups
        decoded, dn_decoded = self.decode_query_sets(self._decode_all, encoded, sets, denoising)
        if self.keep_attention_maps:
            kept = [d[:2] for d in decoded]
            outputs = self._forward_outputs(kept, dn_decoded, encoded, denoising)
            outputs["attention_maps"] = self.attention_outputs([d[2] for d in decoded])
            return outputs
        return self._forward_outputs(decoded, dn_decoded, encoded, denoising)

    def _forward_outputs(self, decoded, dn_decoded, encoded, denoising) -> Dict:
        """:meth:`forward_raw` outputs of the decoded (hidden states, reference boxes) of every
        query set and of the denoising queries (or None)."""
        per_set = []
        for hs, refs in decoded + ([dn_decoded] if dn_decoded else []):
            logits, boxes = self.predict(hs, refs)
            per_set.append(
                {
                    "pred_logits": logits,
                    "pred_boxes": boxes,
                    "hidden_states": hs,
                    "reference_boxes": refs,
                }
            )
        if dn_decoded is None:
            return self._pack_outputs(per_set, encoded)
        outputs = self._pack_outputs(per_set[:-1], encoded)
        outputs["denoising"] = dict(per_set[-1], queries=denoising)
        return outputs

    def losses(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """Weighted detection losses, plus the weighted denoising losses ``loss_*_dn`` (last
        layer) and ``loss_*_dn_{i}`` (layer i) when denoising is enabled and training; they are
        zeros for a batch without objects, so the keys never change."""
        losses = super().losses(outputs, targets)
        weights = self.criterion.weight_dict
        dn_losses = self.denoising_loss_terms(outputs, targets)
        return dict(losses, **{k: v * weights[k] for k, v in dn_losses.items()})
