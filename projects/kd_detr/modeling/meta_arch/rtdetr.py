# Copyright (c) kd_detr contributors.
"""RT-DETR (Zhao et al., CVPR 2024) and RT-DETRv2 (Lv et al., 2024) as a Detectron2
meta-architecture.

backbone -> per-level 1x1 conv + BN -> hybrid encoder (AIFI + CCFF) -> per-level 1x1 conv + BN
(decoder input) -> query selection -> deformable decoder with box refinement. It shares DETR's
pre-processing, targets, output packing and top-k inference (:class:`DETR`) and DINO's training
forward with denoising queries.
"""
import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList

from ..denoising import (
    DenoisingGenerator,
    DenoisingQueries,
    denoising_args_from_config,
    denoising_loss_key,
)
from ..matcher import HungarianMatcher
from ..num_classes import check_num_classes
from ..query_groups import check_box_group, joint_query_pass
from ..transformer import MLP
from ..transformer.rtdetr_decoder import RTDETRDecoder
from ..transformer.rtdetr_encoder import HybridEncoder
from .denoising_forward import DenoisingForwardMixin
from .detr import DETR, ImagesLike
from .rtdetr_criterion import VarifocalCriterion, denoising_targets
from .rtdetr_frames import canvas_scale, to_canvas, to_image

__all__ = ["RTDETR", "encoder_anchors"]


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=False)
    nn.init.xavier_uniform_(conv.weight)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


def encoder_anchors(spatial_shapes, dtype, device, grid_size: float = 0.05):
    """Anchor logits of every encoder token: a box of side ``grid_size * 2^level`` centred on its
    cell, as inverse sigmoid; boxes with a coordinate outside (0.01, 0.99) get the dtype's max.

    Returns:
        tuple: anchors (1, S, 4) and valid (1, S, 1) bool.
    """
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=dtype),
            torch.arange(w, device=device, dtype=dtype),
            indexing="ij",
        )
        xy = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1)
        wh = torch.full_like(xy, grid_size * 2.0**level)
        anchors.append(torch.cat([xy, wh], -1).reshape(1, h * w, 4))
    anchors = torch.cat(anchors, 1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)
    logits = torch.log(anchors / (1 - anchors))
    return torch.where(valid, logits, torch.finfo(dtype).max), valid


@META_ARCH_REGISTRY.register()
class RTDETR(DenoisingForwardMixin, DETR):
    """RT-DETR / RT-DETRv2 (``MODEL.RTDETR.VERSION``).

    * Query selection (uncertainty-minimal / IoU-aware through the varifocal loss): every token
      of the decoder input maps gets class logits (``enc_score_head``) and a box (``enc_bbox_head``
      + its anchor); the top-Q tokens by best class logit give the reference boxes (detached) and,
      unless ``learn_initial_query``, their features (detached) are the content queries. They are
      trained as ``loss_*_enc`` (class-aware Hungarian matching).
    * Decoder (:class:`RTDETRDecoder`): per-layer class / box heads, layer l's boxes refine layer
      l-1's; "pred_boxes" of layer l is the reference layer l + 1 starts from.
    * Contrastive denoising (``MODEL.DETR.DN``, training): noised positive and negative ground
      truth copies decoded before the detection queries with the denoising mask (``loss_*_dn``).
    * Losses: varifocal ("loss_class"), L1, GIoU on every layer (deep supervision).

    The images are not masked: RT-DETR has no padding mask (it trains on fixed square inputs). A
    padded batch is read as is; the model works in the padded canvas' frame and its inputs and
    outputs (groups, denoising, every "*boxes" output) are converted to / from each image's
    unpadded frame (:mod:`.rtdetr_frames`), the identity without padding.

    Extra query groups (distillation) are dicts ``{"boxes": (B or 1, M, 4) cxcywh in [0, 1],
    "content": optional (B or 1, M, d), zeros when absent}``: the boxes are the group's reference
    boxes, refined per layer like the detection queries. Groups never attend to the detection or
    denoising queries or to each other, nor they to groups, so detection outputs do not depend on
    them. ``forward_raw``'s "layers" hold "query_content" (B, Q, d), the content the detection
    queries start from, and "reference_boxes" (L, B, Q, 4), every layer's input reference.
    """

    box_query_groups = True
    decoder_attention_maps = False  # its decoder does not return attention maps

    def detection_query_content(self, batch_size: int, outputs: Dict) -> Optional[torch.Tensor]:
        """(B, Q, d) content the detection queries started from in ``outputs`` (selected
        encoder features, or the learned queries): ``outputs["layers"]["query_content"]``."""
        return outputs.get("layers", {}).get("query_content")

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        encoder: HybridEncoder,
        transformer: RTDETRDecoder,
        criterion: VarifocalCriterion,
        num_classes: int,
        num_queries: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_feature_levels: int = 3,
        aux_loss: bool = True,
        size_divisibility: int = 32,
        test_topk: int = 300,
        group_decoding: str = "separate",
        group_checkpoint: bool = False,
        learn_initial_query: bool = False,
        denoising: Optional[DenoisingGenerator] = None,
    ):
        """
        Args:
            backbone: Detectron2 backbone; ``in_features`` are its maps fed to the encoder.
            encoder: the hybrid encoder (width ``encoder.d``).
            transformer: the decoder (width ``d_model``, one box head per layer).
            criterion: varifocal + L1 + GIoU losses with their weights.
            num_classes, num_queries: C and Q.
            pixel_mean, pixel_std: input normalisation.
            num_feature_levels: decoder levels (>= len(in_features); extra ones are stride-2
                convs on the coarsest encoder map).
            aux_loss, size_divisibility, test_topk, group_decoding, group_checkpoint: see
                :class:`DETR`.
            learn_initial_query: Q learned content queries instead of the selected features.
            denoising: contrastive denoising generator (``MODEL.DETR.DN``), or None.
        """
        nn.Module.__init__(self)  # DETR's single-map modules are not built
        if group_decoding not in ("separate", "masked"):
            raise ValueError(
                f"MODEL.DETR.GROUP_DECODING must be 'separate' or 'masked', got {group_decoding!r}"
            )
        shapes = backbone.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing or len(in_features) != encoder.num_levels:
            raise ValueError(
                f"MODEL.RTDETR.IN_FEATURES {list(in_features)} must be {encoder.num_levels} of the "
                f"backbone's outputs {sorted(shapes)}"
            )
        if num_feature_levels < len(in_features):
            raise ValueError(
                f"MODEL.RTDETR.NUM_FEATURE_LEVELS ({num_feature_levels}) must be >= the "
                f"{len(in_features)} IN_FEATURES"
            )
        self.backbone = backbone
        self.in_features = list(in_features)
        self.encoder = encoder
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.test_topk = test_topk
        self.group_decoding = group_decoding
        self.group_checkpoint = group_checkpoint
        self.use_focal = True
        self.denoising = denoising
        d, d_enc = transformer.d_model, encoder.d
        self.input_proj = nn.ModuleList(_conv_bn(shapes[f].channels, d_enc) for f in in_features)
        extra = num_feature_levels - len(in_features)
        self.decoder_input_proj = nn.ModuleList(
            [_conv_bn(d_enc, d) for _ in in_features]
            + [_conv_bn(d_enc if i == 0 else d, d, 3, 2) for i in range(extra)]
        )
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.enc_score_head = nn.Linear(d, num_classes)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        num_layers = transformer.num_decoder_layers
        self.class_embed = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(num_layers))
        self.learn_initial_query = learn_initial_query
        if learn_initial_query:
            self.tgt_embed = nn.Embedding(num_queries, d)
        self._reset_heads()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    def _reset_heads(self):
        """Class biases at prior probability 0.01, zero last box layers (official RT-DETR)."""
        bias = -math.log((1 - 0.01) / 0.01)
        with torch.no_grad():
            for head in [self.enc_score_head, *self.class_embed]:
                head.bias.fill_(bias)
            for head in [self.enc_bbox_head, *self.bbox_embed]:
                head.layers[-1].weight.zero_()
                head.layers[-1].bias.zero_()
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.transformer.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    @classmethod
    def from_config(cls, cfg):
        check_num_classes(cfg, "MODEL.DETR.NUM_CLASSES")
        r = cfg.MODEL.RTDETR
        backbone = build_backbone(cfg)
        points = list(r.DEC_N_POINTS)
        if len(points) == 1:
            points = points * r.NUM_FEATURE_LEVELS
        if len(points) != r.NUM_FEATURE_LEVELS:
            raise ValueError(
                f"MODEL.RTDETR.DEC_N_POINTS {list(r.DEC_N_POINTS)} needs one value or one per "
                f"level (NUM_FEATURE_LEVELS={r.NUM_FEATURE_LEVELS})"
            )
        cls._check_sampling(cfg, points)
        return cls._from_config(cfg, backbone, points)

    @classmethod
    def _check_sampling(cls, cfg, points: List[int]) -> None:
        """RT-DETR v1 allows only v1's sampling (D-FINE has no version)."""
        r = cfg.MODEL.RTDETR
        if r.VERSION not in (1, 2):
            raise ValueError(f"MODEL.RTDETR.VERSION must be 1 or 2, got {r.VERSION}")
        if r.VERSION == 1 and (
            len(set(points)) != 1 or r.OFFSET_SCALE != 0.5 or r.SAMPLING_METHOD != "default"
        ):
            raise ValueError(
                "RT-DETR v1 samples the same number of points on every level with OFFSET_SCALE "
                "0.5 and bilinear sampling: set MODEL.RTDETR.VERSION 2 for per-level points, "
                "another offset scale or SAMPLING_METHOD 'discrete'"
            )

    @classmethod
    def _build_encoder(cls, cfg) -> HybridEncoder:
        d, r = cfg.MODEL.DETR, cfg.MODEL.RTDETR
        return HybridEncoder(
            num_levels=len(r.IN_FEATURES),
            d=r.ENCODER_HIDDEN_DIM,
            heads=r.ENCODER_NHEADS,
            ffn_dim=r.ENCODER_FFN_DIM,
            num_layers=r.ENCODER_LAYERS,
            dropout=d.DROPOUT,
            act=r.ENCODER_ACTIVATION,
            pre_norm=r.ENCODER_PRE_NORM,
            temperature=r.POSITION_TEMPERATURE,
            encode_levels=r.ENCODE_LEVELS,
            expansion=r.HIDDEN_EXPANSION,
            csp_blocks=r.CSP_BLOCKS,
            ccff_act=r.CCFF_ACTIVATION,
            **cls._encoder_style(cfg),
        )

    @classmethod
    def _encoder_style(cls, cfg) -> Dict:
        """Extra HybridEncoder arguments of the subclass (D-FINE's fusion blocks)."""
        return {}

    @staticmethod
    def _decoder_args(cfg, points: List[int]) -> Dict:
        """Arguments every real-time decoder (RT-DETR's, D-FINE's) takes from the config."""
        d, r = cfg.MODEL.DETR, cfg.MODEL.RTDETR
        return {
            "d_model": d.HIDDEN_DIM,
            "num_layers": d.DEC_LAYERS,
            "heads": d.NHEADS,
            "ffn_dim": d.DIM_FEEDFORWARD,
            "dropout": d.DROPOUT,
            "activation": d.ACTIVATION,
            "points": points,
            "offset_scale": r.OFFSET_SCALE,
            "method": r.SAMPLING_METHOD,
            "kernel": d.DEFORMABLE.ATTN_KERNEL,
        }

    @classmethod
    def _build_decoder(cls, cfg, points: List[int]) -> nn.Module:
        return RTDETRDecoder(
            **cls._decoder_args(cfg, points), look_forward_twice=cfg.MODEL.RTDETR.LOOK_FORWARD_TWICE
        )

    @classmethod
    def _loss_weights(cls, cfg) -> Dict[str, float]:
        """Weights of one decoder layer's losses (the subclass adds its own)."""
        d = cfg.MODEL.DETR
        return {
            "loss_class": d.CLASS_WEIGHT,
            "loss_bbox": d.BBOX_WEIGHT,
            "loss_giou": d.GIOU_WEIGHT,
        }

    @classmethod
    def _from_config(cls, cfg, backbone, points):
        d, r = cfg.MODEL.DETR, cfg.MODEL.RTDETR
        encoder = cls._build_encoder(cfg)
        decoder = cls._build_decoder(cfg, points)
        matcher = HungarianMatcher(
            cost_class=d.COST_CLASS,
            cost_bbox=d.COST_BBOX,
            cost_giou=d.COST_GIOU,
            use_focal=True,
            focal_alpha=r.MATCHER_ALPHA,
            focal_gamma=r.MATCHER_GAMMA,
        )
        base = cls._loss_weights(cfg)
        weights = dict(base)
        if d.DEEP_SUPERVISION:
            for i in range(d.DEC_LAYERS - 1):
                weights.update({f"{k}_{i}": v for k, v in base.items()})
        weights.update({f"{k}_enc": v * r.ENC_LOSS_WEIGHT for k, v in base.items()})
        denoising = None
        if d.DN.ENABLED:
            args = denoising_args_from_config(cfg)
            if not args["contrastive"] or args["with_indicator"]:
                raise ValueError(
                    "RT-DETR uses contrastive denoising without indicator channel: set "
                    "MODEL.DETR.DN.CONTRASTIVE True and MODEL.DETR.DN.LABEL_INDICATOR False"
                )
            denoising = DenoisingGenerator(d.NUM_CLASSES, d.HIDDEN_DIM, **args)
            nn.init.xavier_uniform_(denoising.label_enc.weight)
            dn_keys = [k for k in weights if not k.endswith("_enc")]
            weights.update({denoising_loss_key(k): weights[k] for k in dn_keys})
        criterion = VarifocalCriterion(
            d.NUM_CLASSES,
            matcher,
            weights,
            use_focal=True,
            focal_alpha=d.FOCAL_ALPHA,
            focal_gamma=d.FOCAL_GAMMA,
        )
        return {
            "backbone": backbone,
            "in_features": list(r.IN_FEATURES),
            "encoder": encoder,
            "transformer": decoder,
            "criterion": criterion,
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_feature_levels": r.NUM_FEATURE_LEVELS,
            "aux_loss": d.DEEP_SUPERVISION,
            "size_divisibility": d.SIZE_DIVISIBILITY,
            "test_topk": d.TEST_TOPK,
            "group_decoding": d.GROUP_DECODING,
            "group_checkpoint": d.GROUP_CHECKPOINT,
            "learn_initial_query": r.LEARN_INITIAL_QUERY,
            "denoising": denoising,
        }

    # ---------------------------------------------------------------- encoder
    def encode(self, images: ImagesLike) -> Dict:
        """Backbone, hybrid encoder and decoder input projection.

        Args:
            images: ImageList of normalised images, or (tensor (B, 3, H, W), mask); the mask is
                not used (RT-DETR has none).

        Returns:
            dict: "memory" (B, S, d) flattened decoder input maps, "spatial_shapes" (L pairs),
            "mask" (B, S) all False, "maps" the encoder's output maps.
        """
        tensor = images.tensor if isinstance(images, ImageList) else images[0]
        features = self.backbone(tensor)
        maps = [proj(features[f]) for proj, f in zip(self.input_proj, self.in_features)]
        maps = self.encoder(maps)
        srcs = [proj(x) for proj, x in zip(self.decoder_input_proj, maps)]
        for proj in self.decoder_input_proj[len(maps) :]:
            srcs.append(proj(maps[-1] if len(srcs) == len(maps) else srcs[-1]))
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.zeros(memory.shape[:2], dtype=torch.bool, device=memory.device)
        encoded = {"memory": memory, "spatial_shapes": shapes, "mask": mask, "maps": maps}
        if self.keep_backbone_features:
            encoded["backbone_features"] = features
        return encoded

    # ---------------------------------------------------------------- queries
    def _detection_queries(self, encoded):
        """Query selection: ((content (B, Q, d), boxes (B, Q, 4) detached), and the selected
        tokens' {"pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4)})."""
        memory = encoded["memory"]
        anchors, valid = encoder_anchors(encoded["spatial_shapes"], memory.dtype, memory.device)
        feats = self.enc_output(valid.to(memory.dtype) * memory)
        logits = self.enc_score_head(feats)
        coords = self.enc_bbox_head(feats) + anchors
        if self.num_queries > logits.shape[1]:
            raise ValueError(
                f"query selection needs {self.num_queries} tokens (MODEL.DETR.NUM_QUERIES) but "
                f"the maps have {logits.shape[1]}; use larger images or fewer queries"
            )
        index = logits.max(-1).values.topk(self.num_queries, dim=1).indices

        def gather(x):
            return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

        boxes = gather(coords).sigmoid()
        if self.learn_initial_query:
            content = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        else:
            content = gather(feats).detach()
        return (content, boxes.detach()), {"pred_logits": gather(logits), "pred_boxes": boxes}

    def _parse_groups(self, groups, batch_size):
        """[(content (B, M, d), boxes (B, M, 4))] of validated extra query groups."""
        d, parsed = self.transformer.d_model, []
        for g, group in enumerate(groups):
            boxes, content = check_box_group(group, g, batch_size, d, type(self).__name__)
            boxes = boxes.to(self.pixel_mean.dtype).expand(batch_size, -1, -1)
            if content is None:
                content = boxes.new_zeros(boxes.shape[:2] + (d,))
            parsed.append((content, boxes))
        return parsed

    # ---------------------------------------------------------------- decoder and heads
    def decode(self, encoded, queries, denoising: Optional[DenoisingQueries] = None):
        """Decode query sets that never attend to each other ("masked": one pass whose mask
        composes the denoising mask with group blocks; "separate": one pass per extra group).

        Returns:
            tuple: per set the decoder's dict (tensors (L, B, N_i, ...) or (B, N_i, ...)), and
            the denoising queries' dict or None.
        """
        args = (encoded["memory"], encoded["spatial_shapes"], list(self.bbox_embed))
        content, boxes, sizes, mask, num_joint = joint_query_pass(
            queries, self.group_decoding, denoising
        )
        out = self.transformer(content, boxes, *args, mask)
        split = {k: v.split(sizes, dim=v.dim() - 2) for k, v in out.items()}  # the query dim
        parts = [{k: v[i] for k, v in split.items()} for i in range(len(sizes))]
        dn_part = parts.pop(0) if denoising is not None else None
        rest = [self.transformer(c, b, *args) for c, b in queries[num_joint:]]
        return parts + rest, dn_part

    def predict(self, decoded: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The decoder's outputs plus per-layer logits (L, B, N, C) of each layer's class head."""
        hs = decoded["hidden_states"]
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
        return dict(decoded, pred_logits=logits)

    def forward_raw(
        self,
        images: ImagesLike,
        extra_query_groups: Optional[List[Dict]] = None,
        denoising: Optional[DenoisingQueries] = None,
    ):
        """Raw outputs of every decoder layer for the detection queries and extra query groups.

        Returns:
            dict as :meth:`DETR.forward_raw`; "layers" and groups also hold "reference_boxes"
            (L, B, N, 4), "layers" holds "query_content" (B, Q, d); "enc_outputs" the selected
            tokens' predictions; with ``denoising``, "denoising" holds the denoising queries'
            per-layer outputs plus "queries".
        """
        encoded = self.encode(images)
        scale = canvas_scale(images).to(encoded["memory"].device)  # see rtdetr_frames
        groups = self._parse_groups(extra_query_groups or [], encoded["memory"].shape[0])
        groups = [(c, to_canvas(b, scale)) for c, b in groups]
        detection, enc_outputs = self._detection_queries(encoded)
        dn_canvas = None
        if denoising is not None:
            dn_canvas = dataclasses.replace(denoising, boxes=to_canvas(denoising.boxes, scale))
        sets = [detection] + groups
        decoded, dn_decoded = self.decode_query_sets(self.decode, encoded, sets, dn_canvas)
        per_set = [to_image(self.predict(out), scale) for out in decoded]
        per_set[0]["query_content"] = detection[0]
        outputs = self._pack_outputs(per_set, encoded)
        outputs["enc_outputs"] = to_image(enc_outputs, scale)
        if dn_decoded is not None:
            dn_out = to_image(self.predict(dn_decoded), scale)
            outputs["denoising"] = dict(dn_out, queries=denoising)
        return outputs

    # ---------------------------------------------------------------- losses
    def losses(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """Weighted varifocal / L1 / GIoU losses of every layer, of the selected encoder tokens
        (``loss_*_enc``) and, training with denoising, of the denoising queries (``loss_*_dn``,
        zeros for a batch without objects)."""
        criterion = self.criterion
        loss_dict = criterion(outputs, targets)
        enc = outputs["enc_outputs"]
        num_boxes = criterion.get_num_boxes(targets, enc["pred_logits"].device)
        indices = criterion.matcher(enc, targets)
        enc_losses = criterion.layer_losses(enc, targets, indices, num_boxes)
        loss_dict.update({f"{k}_enc": v for k, v in enc_losses.items()})
        if self.training and self.denoising is not None:
            loss_dict.update(self._denoising_losses(outputs, num_boxes))
        return {k: v * criterion.weight_dict[k] for k, v in loss_dict.items()}

    def _denoising_losses(self, outputs, num_boxes) -> Dict[str, torch.Tensor]:
        dn = outputs.get("denoising")
        keys = [k for k in self.criterion.weight_dict if "_dn" in k]
        if dn is None:  # no object in the batch: zeros keeping the label embedding in the graph
            zero = outputs["pred_logits"].sum() * 0 + self.denoising.label_enc.weight.sum() * 0
            return {k: zero for k in keys}
        queries = dn["queries"]
        targets, indices = denoising_targets(queries)
        normalizer = num_boxes * queries.num_groups
        num_layers = dn["pred_logits"].shape[0]
        layers = range(num_layers) if self.aux_loss else [num_layers - 1]
        losses = {}
        for i in layers:
            layer = {"pred_logits": dn["pred_logits"][i], "pred_boxes": dn["pred_boxes"][i]}
            suffix = "" if i == num_layers - 1 else f"_{i}"
            terms = self.criterion.layer_losses(layer, targets, indices, normalizer)
            losses.update({denoising_loss_key(k + suffix): v for k, v in terms.items()})
        return losses
