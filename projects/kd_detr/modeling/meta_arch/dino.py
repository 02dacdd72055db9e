# Copyright (c) kd_detr contributors.
"""DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes", ICLR 2023) as a
Detectron2 meta-architecture.

It reuses Deformable DETR's multi-scale input, encoder and encoder proposals
(:class:`DeformableDETR`), the denoising package (contrastive denoising) and adds mixed query
selection and the look-forward-twice decoder (:class:`DINOTransformer`).
"""
import copy
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
from ..position_encoding import PositionEmbeddingSine
from ..query_groups import joint_query_pass
from ..transformer import split_attention_maps
from ..transformer.dab_transformer import inverse_sigmoid
from ..transformer.query_selection import EncoderProposals, topk_indices
from .deformable_detr import DeformableDETR
from .denoising_forward import DenoisingForwardMixin
from .detr import ImagesLike

__all__ = ["DINO"]

# (content (B, N, d), reference boxes (B, N, 4))
QuerySet = Tuple[torch.Tensor, torch.Tensor]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, K) of ``x`` (B, S, C) -> (B, K, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@META_ARCH_REGISTRY.register()
class DINO(DenoisingForwardMixin, DeformableDETR):
    """DINO: Deformable DETR encoder, mixed query selection, contrastive denoising and
    look-forward-twice box refinement; sigmoid focal classification.

    * Mixed query selection: every encoder token proposes a box (``encoder_proposals``,
      ``enc_class_embed``, ``enc_bbox_embed``); the top-Q tokens by their best class logit give
      the decoder's reference boxes (detached), while the content queries are Q learned
      embeddings (``tgt_embed``), not encoder features. The selected proposals get the
      detection losses as ``loss_*_enc`` (class-aware, Hungarian matching, as DINO's
      "interm" outputs).
    * Decoder (:class:`DINOTransformer`): positional queries from each layer's reference box;
      class and box heads shared by all layers (``share_heads``, official DINO) or one pair per
      layer (detrex); layer l's box head predicts layer l's boxes and refines the next layer's
      reference; look forward twice.
    * Contrastive denoising (``denoising``, training only): per group, noised positive copies
      of the ground truth (small noise, reconstruct their object) and negative copies (larger
      noise, "no object"), decoded before the matching queries with the denoising attention
      mask; losses ``loss_*_dn`` (and ``loss_*_dn_{i}`` per auxiliary layer).

    Extra query groups (distillation) are dicts ``{"boxes": (B or 1, M, 4) cxcywh in [0, 1],
    "content": optional (B or 1, M, d), zeros when absent}``: the boxes are the group's
    reference boxes, refined per layer like the detection queries. Groups never attend to the
    detection or denoising queries or to each other, and nobody attends to them (the denoising
    mask and the group blocks are composed), so detection outputs do not depend on them.
    ``forward_raw``'s "layers" hold "query_content" (B, Q, d), the learned content queries, and
    "reference_boxes" (L, B, Q, 4), every layer's input reference (layer 0: the selected
    proposals).
    """

    @configurable
    def __init__(
        self,
        *,
        learned_content: bool = True,
        position_offset: float = 0.0,
        share_heads: bool = True,
        denoising: Optional[DenoisingGenerator] = None,
        **kwargs,
    ):
        """
        Args:
            learned_content: mixed query selection (learned content queries); False takes the
                selected encoder features as content.
            position_offset: offset of the feature-map sine encoding (official 0, detrex -0.5).
            share_heads: one class / box head for every decoder layer (official); False gives
                each layer its own (``class_embed`` / ``bbox_embed`` become ModuleLists of L
                equally initialised heads, detrex's layout).
            denoising: contrastive denoising generator (``MODEL.DETR.DN``), or None.
            kwargs: arguments of :class:`DeformableDETR`; ``transformer`` must be a
                DINOTransformer.
        """
        transformer = kwargs["transformer"]
        if not hasattr(getattr(transformer, "decoder", None), "ref_point_head"):
            raise TypeError(
                "DINO needs MODEL.DETR.TRANSFORMER_NAME 'DINOTransformer', got "
                f"{type(transformer).__name__}"
            )
        kwargs.update(with_box_refine=True, two_stage=True)
        super().__init__(**kwargs)
        d = self.transformer.d_model
        self.position_encoding = PositionEmbeddingSine(
            d // 2,
            temperature=self.position_encoding.temperature_h,
            normalize=True,
            offset=position_offset,
        )
        self.learned_content = learned_content
        if learned_content:
            self.tgt_embed = nn.Embedding(self.num_queries, d)
            nn.init.normal_(self.tgt_embed.weight)
        self.denoising = denoising
        self.share_heads = share_heads
        if not share_heads:
            if not isinstance(self.class_embed, nn.Linear):
                raise ValueError(
                    "the open-vocabulary class head (MODEL.DETR.CLASS_HEAD region_text) is one "
                    "head shared by all layers: set MODEL.DETR.DINO.SHARE_HEADS True"
                )
            num = self.transformer.num_decoder_layers
            self.class_embed = nn.ModuleList(copy.deepcopy(self.class_embed) for _ in range(num))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(self.bbox_embed) for _ in range(num))

    def _build_query_modules(self, d: int, num_layers: int) -> None:
        """Class / box heads shared by the decoder layers, the encoder's own copies and the
        encoder proposals."""
        with torch.no_grad():
            if isinstance(self.class_embed, nn.Linear):  # an open-vocabulary head sets its own
                self.class_embed.bias.fill_(-math.log((1 - 0.01) / 0.01))  # prior probability 0.01
            self.bbox_embed.layers[-1].weight.zero_()
            self.bbox_embed.layers[-1].bias.zero_()
        self.enc_class_embed = copy.deepcopy(self.class_embed)
        self.enc_bbox_embed = copy.deepcopy(self.bbox_embed)
        self.encoder_proposals = EncoderProposals(d)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        ret = super().from_config(cfg)
        weights = ret["criterion"].weight_dict
        base = {k: v for k, v in weights.items() if not k.endswith("_enc")}
        if d.DN.ENABLED:
            ret["denoising"] = DenoisingGenerator(
                d.NUM_CLASSES, d.HIDDEN_DIM, **denoising_args_from_config(cfg)
            )
            weights.update({denoising_loss_key(k): v for k, v in base.items()})
        for key in ("loss_class", "loss_bbox", "loss_giou"):
            weights[f"{key}_enc"] = weights[key] * d.DINO.ENC_LOSS_WEIGHT
        ret.update(
            learned_content=d.DINO.LEARNED_CONTENT,
            position_offset=d.DINO.POSITION_OFFSET,
            share_heads=d.DINO.SHARE_HEADS,
        )
        return ret

    def _heads(self) -> Tuple[List[nn.Module], List[nn.Module]]:
        """Class and box heads of every decoder layer (shared or per layer), then the
        encoder's."""
        if not self.share_heads:
            return (
                list(self.class_embed) + [self.enc_class_embed],
                list(self.bbox_embed) + [self.enc_bbox_embed],
            )
        num = self.transformer.num_decoder_layers
        return (
            [self.class_embed] * num + [self.enc_class_embed],
            [self.bbox_embed] * num + [self.enc_bbox_embed],
        )

    # ---------------------------------------------------------------- queries
    def _detection_queries(self, encoded) -> Tuple[QuerySet, Dict]:
        """Mixed query selection.

        Returns:
            tuple: (content (B, Q, d), reference boxes (B, Q, 4) detached) and the selected
            proposals' predictions {"pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4)}.
        """
        feats = encoded["proposal_features"]  # (B, S, d)
        logits = self.enc_class_embed(feats)  # (B, S, C)
        coords = self.enc_bbox_embed(feats) + encoded["proposal_logits"]  # (B, S, 4)
        index = topk_indices(logits.max(-1).values, self.num_queries)  # (B, Q)
        boxes = _gather(coords, index).sigmoid()
        if self.learned_content:
            content = self.tgt_embed.weight[None].expand(feats.shape[0], -1, -1)
        else:
            content = _gather(feats, index).detach()
        enc_outputs = {"pred_logits": _gather(logits, index), "pred_boxes": boxes}
        return (content, boxes.detach()), enc_outputs

    def _group_queries(self, boxes, content) -> QuerySet:
        """An extra group's (content, boxes); absent content is zeros."""
        if content is None:
            content = boxes.new_zeros(boxes.shape[:2] + (self.transformer.d_model,))
        return content, boxes

    # ---------------------------------------------------------------- decoder and heads
    def decode(self, encoded, queries: List[QuerySet], denoising=None):
        """Decode query sets that never attend to each other, with optional denoising queries
        prepended to the first (detection) set.

        With ``GROUP_DECODING`` "masked" everything is one pass whose self-attention mask
        composes the denoising mask with the group blocks; "separate" decodes each extra group
        in its own pass.

        Returns:
            tuple: per query set, (hidden states (L, B, N_i, d), references (L, B, N_i, 4));
            and the denoising queries' pair, or None. With ``keep_attention_maps`` every query
            set's tuple has a third entry, its attention maps (see :meth:`DETR.decode`; the
            denoising queries have none).
        """
        heads = self._heads()[1][:-1]
        content, boxes, sizes, mask, num_joint = joint_query_pass(
            queries, self.group_decoding, denoising
        )
        if self.keep_attention_maps:
            hs, refs, maps = self.transformer.decode(
                content, boxes, encoded, heads, mask, need_weights=True
            )
            parts = list(zip(hs.split(sizes, dim=2), refs.split(sizes, dim=2)))
            own = split_attention_maps(maps, sizes)
            dn_part = parts.pop(0) if denoising is not None else None
            own = own[1:] if denoising is not None else own
            rest = [
                self.transformer.decode(c, b, encoded, heads, need_weights=True)
                for c, b in queries[num_joint:]
            ]
            return [(*p, m) for p, m in zip(parts, own)] + rest, dn_part
        hs, refs = self.transformer.decode(content, boxes, encoded, heads, mask)
        parts = list(zip(hs.split(sizes, dim=2), refs.split(sizes, dim=2)))
        dn_part = parts.pop(0) if denoising is not None else None
        rest = [self.transformer.decode(c, b, encoded, heads) for c, b in queries[num_joint:]]
        return parts + rest, dn_part

    def predict(self, hs, references) -> Dict[str, torch.Tensor]:
        """Layer l's heads on its states: logits (L, B, N, C) and boxes
        ``sigmoid(bbox_embed_l(h_l) + inverse_sigmoid(r_l))`` (L, B, N, 4), with "hidden_states"
        and the (detached) "reference_boxes" r_l."""
        if self.share_heads:
            logits, deltas = self.class_embed(hs), self.bbox_embed(hs)
        else:
            class_heads, box_heads = self._heads()
            logits = torch.stack([head(h) for head, h in zip(class_heads, hs)])
            deltas = torch.stack([head(h) for head, h in zip(box_heads, hs)])
        boxes = (deltas + inverse_sigmoid(references, self.inverse_sigmoid_eps)).sigmoid()
        return {
            "pred_logits": logits,
            "pred_boxes": boxes,
            "hidden_states": hs,
            "reference_boxes": references.detach(),
        }

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
            denoising: optional denoising queries (training; built by ``self.denoising``).

        Returns:
            dict as :meth:`DETR.forward_raw`; "layers" and every group also hold
            "reference_boxes" (L, B, N, 4), "layers" holds "query_content" (B, Q, d);
            "enc_outputs" holds the selected proposals' {"pred_logits" (B, Q, C),
            "pred_boxes" (B, Q, 4)}; with ``denoising``, "denoising" holds the denoising
            queries' per-layer outputs plus "queries". With ``keep_attention_maps``,
            "attention_maps" (:meth:`DETR.attention_outputs`, "cross_attn" over the multi-scale
            memory tokens; denoising queries left out).
        """
        encoded = self.encode(images)
        bsz = encoded["memory"].shape[0]
        groups = self._parse_groups(extra_query_groups or [], bsz)
        detection, enc_outputs = self._detection_queries(encoded)
        sets = [detection] + [self._group_queries(b, c) for b, c in groups]
        decoded, dn_decoded = self.decode_query_sets(self.decode, encoded, sets, denoising)
        per_set = [self.predict(out[0], out[1]) for out in decoded]
        per_set[0]["query_content"] = detection[0]
        outputs = self._pack_outputs(per_set, encoded)
        outputs["enc_outputs"] = enc_outputs
        if dn_decoded is not None:
            outputs["denoising"] = dict(self.predict(*dn_decoded), queries=denoising)
        if self.keep_attention_maps:
            outputs["attention_maps"] = self.attention_outputs([out[2] for out in decoded])
        return outputs

    # ---------------------------------------------------------------- losses
    def losses(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """Weighted detection losses, ``loss_*_enc`` of the selected proposals and, training
        with denoising, ``loss_*_dn`` (zeros for a batch without objects, so the keys never
        change); extra groups are ignored."""
        criterion = self.criterion
        loss_dict = criterion(outputs, targets)
        enc = outputs["enc_outputs"]
        num_boxes = criterion.get_num_boxes(targets, enc["pred_logits"].device)
        indices = criterion.matcher(enc, targets)
        enc_losses = criterion.layer_losses(enc, targets, indices, num_boxes)
        loss_dict.update({f"{k}_enc": v for k, v in enc_losses.items()})
        loss_dict.update(self.denoising_loss_terms(outputs, targets))
        return {k: v * criterion.weight_dict[k] for k, v in loss_dict.items()}
