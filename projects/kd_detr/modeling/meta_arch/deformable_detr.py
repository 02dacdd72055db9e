# Copyright (c) kd_detr contributors.
"""Deformable DETR (Zhu et al., ICLR 2021) as a Detectron2 meta-architecture, with the paper's
iterative box refinement and two-stage variants.

It shares DETR's preprocessing, losses and inference (:class:`DETR`) and replaces the single
feature map by L levels (backbone maps + stride-2 convs) read by multi-scale deformable attention.
"""
import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList

from ..position_encoding import PositionEmbeddingSine
from ..query_groups import block_diagonal_mask, check_box_group
from ..transformer import MLP, split_attention_maps
from ..transformer.deformable_transformer import reference_logits
from ..transformer.query_selection import (
    EncoderProposals,
    ProposalQueryEmbedding,
    box_sine_embedding_xywh,
    topk_proposals,
)
from .detr import DETR, ImagesLike, padding_mask

__all__ = ["DeformableDETR"]

# (content (B, N, d), positional query (B, N, d), references (B, N, 4), point mask (N,) or None)
QuerySet = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def _projection(in_channels: int, d: int, extra: bool) -> nn.Sequential:
    """1x1 conv (backbone level) or 3x3 stride-2 conv (extra level), then GroupNorm(32, d)."""
    if extra:
        conv = nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1)
    else:
        conv = nn.Conv2d(in_channels, d, kernel_size=1)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, d))


@META_ARCH_REGISTRY.register()
class DeformableDETR(DETR):
    """Deformable DETR: multi-scale features, deformable attention, sigmoid focal classification.

    Detection queries:

    * single-stage: ``query_embed`` (Q, 2d) split into a positional query and content; the
      reference is a 2-d point ``sigmoid(reference_points(pos))``.
    * two-stage (``two_stage``): every encoder token proposes a box (``encoder_proposals`` +
      the extra last class / box heads); the top-Q proposals by their first class logit give the
      reference boxes, and ``proposal_query`` turns their sine embedding into positional and
      content queries. The proposals are trained with class-agnostic targets (``loss_*_enc``).

    With ``with_box_refine`` every layer has its own heads and refines the previous layer's boxes
    (2-d points become boxes after layer 0); otherwise the heads are shared and the references
    stay fixed. Boxes are ``sigmoid(bbox_head(h) + inverse_sigmoid(reference))`` (a point's w, h
    are predicted directly).

    Extra query groups (distillation) are dicts ``{"boxes": (B or 1, M, 4) cxcywh in [0, 1],
    "content": optional (B or 1, M, d)}``. The boxes are always the group's 4-d reference boxes
    (deformable sampling scaled by the box, as for two-stage queries), so every model that
    decodes a group looks at the same regions; with box refinement they are refined per layer
    like the detection queries, otherwise they stay as given in every layer. Positional queries
    come from the boxes through this model's own embedding: the two-stage ``proposal_query``
    (which also gives the content used when "content" is absent: a group box is decoded exactly
    like a proposal at that box), or, single-stage, the sine embedding of the boxes through
    ``box_pos_head`` (a 2-layer MLP, as DAB/DINO-style deformable decoders embed boxes) with zero
    content when absent. ``box_pos_head`` only serves groups: a teacher trained without groups
    keeps its initial weights there. Groups never attend to the detection queries or to each
    other (``MODEL.DETR.GROUP_DECODING``), so detection outputs and losses do not depend on them.

    ``forward_raw``'s "layers" also hold "query_content" (B, Q, d), the detection queries' initial
    content (image dependent for two-stage), for distillation's specific points. For 2-d point
    references the reported "reference_boxes" carry the point and the w, h the layer predicts.
    """

    # Decodes extra query groups of boxes (distillation points): DistillableDETR interface.
    box_query_groups = True
    # "attention_maps" with ``keep_attention_maps``: the decoder's self-attention weights and
    # its deformable cross-attention's sampling weights scattered onto the memory tokens.
    decoder_attention_maps = True

    def detection_query_content(self, batch_size: int, outputs: Dict) -> torch.Tensor:
        """(B, Q, d) content the detection queries started from in ``outputs`` (image-dependent
        for two-stage): ``outputs["layers"]["query_content"]`` (None without outputs)."""
        return outputs.get("layers", {}).get("query_content")

    @configurable
    def __init__(
        self,
        *,
        in_features: Sequence[str],
        with_box_refine: bool = False,
        two_stage: bool = False,
        inverse_sigmoid_eps: float = 1e-5,
        **kwargs,
    ):
        """
        Args:
            in_features: backbone maps fed to the transformer, fine to coarse.
            with_box_refine: iterative box refinement with per-layer heads.
            two_stage: queries from the top-Q encoder proposals.
            inverse_sigmoid_eps: clamp of ``inverse_sigmoid`` in box predictions.
            kwargs: arguments of :class:`DETR`; ``transformer`` must be a DeformableTransformer
                and ``criterion`` must use the focal loss.
        """
        backbone, transformer = kwargs["backbone"], kwargs["transformer"]
        num_levels = getattr(transformer, "num_feature_levels", None)
        if num_levels is None:
            raise TypeError(
                "DeformableDETR needs MODEL.DETR.TRANSFORMER_NAME 'DeformableTransformer', got "
                f"{type(transformer).__name__}"
            )
        shapes = backbone.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing or not in_features or len(in_features) > num_levels:
            raise ValueError(
                f"MODEL.DETR.DEFORMABLE.IN_FEATURES {list(in_features)} must be 1 to "
                f"NUM_FEATURE_LEVELS={num_levels} of the backbone's outputs {sorted(shapes)} "
                "(e.g. set MODEL.RESNETS.OUT_FEATURES ['res3', 'res4', 'res5'])"
            )
        super().__init__(**kwargs)
        if not self.use_focal:
            raise ValueError(
                "DeformableDETR uses the sigmoid focal loss: set MODEL.DETR.USE_FOCAL_LOSS True"
            )
        d = self.transformer.d_model
        num_layers = self.transformer.num_decoder_layers
        if d % 32 != 0:
            raise ValueError(
                "DeformableDETR: MODEL.DETR.HIDDEN_DIM must be a multiple of 32 (GroupNorm with "
                f"32 groups), got {d}"
            )
        self.in_features = list(in_features)
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        channels = [shapes[f].channels for f in in_features]
        extra = num_levels - len(in_features)
        self.input_proj = nn.ModuleList(
            [_projection(c, d, extra=False) for c in channels]
            + [_projection(channels[-1] if i == 0 else d, d, extra=True) for i in range(extra)]
        )
        self.position_encoding = PositionEmbeddingSine(
            d // 2,
            temperature=self.position_encoding.temperature_h,
            normalize=True,
            offset=-0.5,
        )
        self._build_query_modules(d, num_layers)

    def _build_query_modules(self, d: int, num_layers: int) -> None:
        """Heads, query embeddings and proposal modules, once the input projection is built
        (DINO overrides this)."""
        self._build_heads(d, num_layers + (1 if self.two_stage else 0))
        if self.two_stage:
            self.encoder_proposals = EncoderProposals(d)
            self.proposal_query = ProposalQueryEmbedding(d)
        else:
            self.query_embed = nn.Embedding(self.num_queries, 2 * d)
            self.reference_points = nn.Linear(d, 2)
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
            self.box_pos_head = MLP(2 * d, d, d, 2)

    def _build_heads(self, d: int, num_pred: int) -> None:
        """Class / box heads: shared by all layers, or one per layer with box refinement (plus
        the encoder-proposal heads for two-stage, last)."""
        class_head, box_head = self.class_embed, self.bbox_embed
        with torch.no_grad():
            if isinstance(class_head, nn.Linear):  # an open-vocabulary head sets its own bias
                class_head.bias.fill_(-math.log((1 - 0.01) / 0.01))  # prior probability 0.01
            box_head.layers[-1].weight.zero_()
            box_head.layers[-1].bias.zero_()
            box_head.layers[-1].bias[2:] = -2.0
        if self.with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_pred))
            with torch.no_grad():
                for head in self.bbox_embed[1:]:
                    head.layers[-1].bias[2:] = 0.0
        if self.two_stage:
            with torch.no_grad():
                for head in self._heads()[1]:
                    head.layers[-1].bias[2:] = 0.0

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        f = d.DEFORMABLE
        ret = super().from_config(cfg)
        if f.TWO_STAGE:
            weights = ret["criterion"].weight_dict
            for key in ("loss_class", "loss_bbox", "loss_giou"):
                weights[f"{key}_enc"] = weights[key] * f.ENC_LOSS_WEIGHT
        ret.update(
            in_feature=f.IN_FEATURES[-1] if f.IN_FEATURES else "",
            in_features=list(f.IN_FEATURES),
            with_box_refine=f.WITH_BOX_REFINE,
            two_stage=f.TWO_STAGE,
            inverse_sigmoid_eps=f.INVERSE_SIGMOID_EPS,
        )
        return ret

    def _build_detection_queries(self, hidden_dim: int) -> None:
        """Detection queries are created by :meth:`__init__` once ``two_stage`` is known."""

    def _heads(self) -> Tuple[List[nn.Module], List[nn.Module]]:
        """Class and box heads of every decoder layer (+ the encoder's for two-stage)."""
        num = self.transformer.num_decoder_layers + (1 if self.two_stage else 0)
        if self.with_box_refine:
            return list(self.class_embed), list(self.bbox_embed)
        return [self.class_embed] * num, [self.bbox_embed] * num

    # ---------------------------------------------------------------- encoder
    def encode(self, images: ImagesLike) -> Dict:
        """Backbone, multi-scale projection and encoder.

        Args:
            images: an ImageList of normalised images, or (tensor (B, 3, H, W), mask (B, H, W)
                bool True on padding).

        Returns:
            dict: "memory" (B, S, d), "mask" (B, S), "pos" (B, S, d), "src" (B, S, d),
            "spatial_shapes" (L pairs (h, w)), "valid_ratios" (B, L, 2); two-stage adds
            "proposal_features" (B, S, d) and "proposal_logits" (B, S, 4); with
            ``keep_backbone_features``, "backbone_features" (the backbone's output dict).
        """
        if isinstance(images, ImageList):
            tensor, mask = images.tensor, padding_mask(images)
        else:
            tensor, mask = images
        features = self.backbone(tensor)
        maps = [features[name] for name in self.in_features]
        srcs = [proj(x) for proj, x in zip(self.input_proj, maps)]
        for proj in self.input_proj[len(maps) :]:
            srcs.append(proj(maps[-1] if len(srcs) == len(maps) else srcs[-1]))
        masks = [
            F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs
        ]
        pos = [self.position_encoding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        encoded = self.transformer.encode(srcs, masks, pos)
        if self.two_stage:
            feats, logits = self.encoder_proposals(
                encoded["memory"], encoded["mask"], encoded["spatial_shapes"]
            )
            encoded.update(proposal_features=feats, proposal_logits=logits)
        if self.keep_backbone_features:
            encoded["backbone_features"] = features
        return encoded

    # ---------------------------------------------------------------- queries
    def _detection_queries(self, encoded) -> Tuple[QuerySet, Optional[Dict]]:
        """The detection query set and, for two-stage, the encoder proposals' predictions
        {"pred_logits" (B, S, C), "pred_boxes" (B, S, 4)}."""
        bsz, d = encoded["memory"].shape[0], self.transformer.d_model
        if not self.two_stage:
            pos, content = self.query_embed.weight.split(d, dim=1)
            points = self.reference_points(pos).sigmoid()
            boxes = torch.cat([points, torch.zeros_like(points)], -1)
            point_mask = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
            expand = [t[None].expand(bsz, -1, -1) for t in (content, pos, boxes)]
            return (*expand, point_mask), None
        class_heads, box_heads = self._heads()
        feats = encoded["proposal_features"]
        enc_logits = class_heads[-1](feats)
        enc_coords = box_heads[-1](feats) + encoded["proposal_logits"]
        boxes = topk_proposals(enc_logits[..., 0], enc_coords, self.num_queries).sigmoid()
        pos, content = self.proposal_query(boxes)
        return (content, pos, boxes, None), {
            "pred_logits": enc_logits,
            "pred_boxes": enc_coords.sigmoid(),
        }

    def _group_queries(self, boxes, content) -> QuerySet:
        """Query set of an extra group: (B, M, 4) boxes and optional (B, M, d) content."""
        if self.two_stage:
            pos, derived = self.proposal_query(boxes)
            return (derived if content is None else content), pos, boxes, None
        pos = self.box_pos_head(box_sine_embedding_xywh(boxes, self.transformer.d_model // 2))
        return (torch.zeros_like(pos) if content is None else content), pos, boxes, None

    def _parse_groups(self, groups, batch_size):
        """Validate extra query groups; returns [(boxes (B, M, 4), content (B, M, d) or None)]."""
        d = self.transformer.d_model
        parsed = []
        for g, group in enumerate(groups):
            boxes, content = check_box_group(group, g, batch_size, d, "DeformableDETR")
            boxes = boxes.to(self.pixel_mean.dtype).expand(batch_size, -1, -1)
            parsed.append((boxes, content))
        return parsed

    # ---------------------------------------------------------------- decoder and heads
    def decode(self, encoded, queries: List[QuerySet]):
        """Decode query sets that do not attend to each other.

        Returns:
            list[tuple]: per set, hidden states (L, B, N_i, d), input references (L, B, N_i, 4)
            and their point masks (L, N_i); with ``keep_attention_maps`` a fourth entry, the
            set's attention maps (see :meth:`DETR.decode`; "cross_attn" over the S multi-scale
            memory tokens).
        """
        heads = self._heads()[1] if self.with_box_refine else None
        need = self.keep_attention_maps
        if self.group_decoding == "separate" or len(queries) == 1:
            return [
                self.transformer.decode(
                    c, p, b, encoded, point_mask=m, box_heads=heads, need_weights=need
                )
                for c, p, b, m in queries
            ]
        sizes = [q[0].shape[1] for q in queries]
        content, pos, boxes = (torch.cat([q[i] for q in queries], dim=1) for i in range(3))
        point_mask = torch.cat(
            [
                torch.zeros(n, dtype=torch.bool, device=boxes.device) if m is None else m
                for n, (*_, m) in zip(sizes, queries)
            ]
        )
        decoded = self.transformer.decode(
            content,
            pos,
            boxes,
            encoded,
            point_mask=point_mask,
            box_heads=heads,
            self_attn_mask=block_diagonal_mask(sizes, boxes.device),
            need_weights=need,
        )
        hs, refs, masks = decoded[:3]
        parts = list(zip(hs.split(sizes, 2), refs.split(sizes, 2), masks.split(sizes, 1)))
        if need:
            return [(*p, m) for p, m in zip(parts, split_attention_maps(decoded[3], sizes))]
        return parts

    def predict(self, hs, references, point_masks) -> Dict[str, torch.Tensor]:
        """Heads of every layer: logits (L, B, N, C), boxes (L, B, N, 4), and the reported
        references (points get the w, h their layer predicts)."""
        class_heads, box_heads = self._heads()
        if self.with_box_refine:
            logits = torch.stack([head(h) for head, h in zip(class_heads, hs)])
            deltas = torch.stack([head(h) for head, h in zip(box_heads, hs)])
        else:
            logits, deltas = self.class_embed(hs), self.bbox_embed(hs)
        base = torch.stack(
            [
                reference_logits(r, m, self.inverse_sigmoid_eps)
                for r, m in zip(references, point_masks)
            ]
        )
        boxes = (deltas + base).sigmoid()
        is_point = point_masks[:, None, :, None]  # (L, 1, N, 1)
        wh = torch.where(is_point, boxes[..., 2:].detach(), references[..., 2:])
        return {
            "pred_logits": logits,
            "pred_boxes": boxes,
            "hidden_states": hs,
            "reference_boxes": torch.cat([references[..., :2], wh], -1),
        }

    def forward_raw(self, images: ImagesLike, extra_query_groups: Optional[List[Dict]] = None):
        """Raw outputs of every decoder layer for the detection queries and extra query groups.

        Args:
            images: ImageList of normalised images, or (tensor (B, 3, H, W), mask (B, H, W)).
            extra_query_groups: optional list of dicts {"boxes": (B|1, M, 4) cxcywh in [0, 1],
                "content": optional (B|1, M, d)}.

        Returns:
            dict as :meth:`DABDETR.forward_raw`; "layers" also holds "query_content" (B, Q, d),
            and two-stage adds "enc_outputs" {"pred_logits" (B, S, C), "pred_boxes" (B, S, 4)}
            of the encoder proposals. With ``keep_attention_maps``, "attention_maps"
            (:meth:`DETR.attention_outputs`, "cross_attn" over the multi-scale memory tokens).
        """
        encoded = self.encode(images)
        bsz = encoded["memory"].shape[0]
        groups = self._parse_groups(extra_query_groups or [], bsz)
        detection, enc_outputs = self._detection_queries(encoded)
        sets = [detection] + [self._group_queries(b, c) for b, c in groups]
        decoded, _ = self.decode_query_sets(self._decode_all, encoded, sets)
        maps = None
        if self.keep_attention_maps:
            maps = [out[3] for out in decoded]
            decoded = [out[:3] for out in decoded]
        per_set = [self.predict(*out) for out in decoded]
        per_set[0]["query_content"] = detection[0]
        outputs = self._pack_outputs(per_set, encoded)
        if enc_outputs is not None:
            outputs["enc_outputs"] = enc_outputs
        if maps is not None:
            outputs["attention_maps"] = self.attention_outputs(maps)
        return outputs

    # ---------------------------------------------------------------- losses
    def losses(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """Weighted detection losses (+ the two-stage proposals' ``loss_*_enc`` against
        class-agnostic targets); extra groups are ignored."""
        loss_dict = self.criterion(outputs, targets)
        enc = outputs.get("enc_outputs")
        if enc is not None:
            agnostic = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            indices = self.criterion.matcher(enc, agnostic)
            num_boxes = self.criterion.get_num_boxes(targets, enc["pred_logits"].device)
            enc_losses = self.criterion.layer_losses(enc, agnostic, indices, num_boxes)
            loss_dict.update({f"{k}_enc": v for k, v in enc_losses.items()})
        if self.training and not self.two_stage and not outputs["groups"]:
            # box_pos_head only serves extra groups: a zero term keeps it in the autograd graph
            # so that DistributedDataParallel does not report unused parameters.
            unused = sum(p.sum() for p in self.box_pos_head.parameters())
            loss_dict["loss_class"] = loss_dict["loss_class"] + 0.0 * unused
        return {k: v * self.criterion.weight_dict[k] for k, v in loss_dict.items()}
