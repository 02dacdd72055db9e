# Copyright (c) kd_detr contributors.
"""DETR (Carion et al., 2020) as a Detectron2 meta-architecture, split for distillation reuse:
``forward_raw`` (images -> raw per-layer outputs), ``losses`` and ``inference``."""
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from ..box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..class_head import class_head_factory, linear_class_head
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..num_classes import check_num_classes
from ..position_encoding import PositionEmbeddingSine
from ..transformer import MLP, build_transformer, split_attention_maps

__all__ = ["DETR", "padding_mask"]

ImagesLike = Union[ImageList, Tuple[torch.Tensor, torch.Tensor]]


def padding_mask(images: ImageList) -> torch.Tensor:
    """(B, H, W) bool mask of an ImageList, True on padding."""
    bsz, _, height, width = images.tensor.shape
    mask = torch.ones((bsz, height, width), dtype=torch.bool, device=images.tensor.device)
    for i, (h, w) in enumerate(images.image_sizes):
        mask[i, :h, :w] = False
    return mask


@META_ARCH_REGISTRY.register()
class DETR(nn.Module):
    """DETR: backbone -> 1x1 projection -> transformer -> class head and 3-layer box MLP.

    Extra query groups (for distillation) are decoded with the detection queries' decoder and
    heads but never interact with them or with each other; they do not change the detection
    outputs or losses. Vanilla DETR has no box queries, so a group is a dict with "content"
    and/or "pos", each (B or 1, M, d); a leading 1 is shared by all images.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        transformer: nn.Module,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        aux_loss: bool = True,
        size_divisibility: int = 32,
        position_temperature: float = 10000.0,
        test_topk: int = 100,
        group_decoding: str = "separate",
        group_checkpoint: bool = False,
        class_head: Callable[[int, int, bool], nn.Module] = linear_class_head,
    ):
        """
        Args:
            backbone: Detectron2 backbone; ``in_feature`` is the map fed to the transformer.
            transformer: encoder-decoder with ``d_model``, ``encode`` and ``decode`` (see
                :class:`DETRTransformer`).
            criterion: set criterion; its ``weight_dict`` scales the losses and its ``use_focal``
                selects C (focal) or C + 1 (softmax) class logits.
            num_classes: C, object classes.
            num_queries: Q, learned detection queries.
            pixel_mean, pixel_std: per-channel normalisation, in the input image format.
            aux_loss: losses on every decoder layer (``outputs["aux_outputs"]``).
            size_divisibility: pad batched images to a multiple of this.
            position_temperature: temperature of the sine positional encoding.
            test_topk: detections kept per image (0 = all queries).
            group_decoding: "separate" or "masked" (see ``MODEL.DETR.GROUP_DECODING``).
            group_checkpoint: in training, decode the extra query groups in their own pass whose
                decoder activations are recomputed in the backward pass instead of kept
                (``MODEL.DETR.GROUP_CHECKPOINT``; less memory, one more group forward).
            class_head: ``make(d, C, use_focal)`` building the class head (d -> K logits, applied
                to every decoder layer); default a linear layer. ``from_config`` takes it from
                ``CLASS_HEAD_REGISTRY`` (``MODEL.DETR.CLASS_HEAD``).
        """
        super().__init__()
        if group_decoding not in ("separate", "masked"):
            raise ValueError(
                f"group_decoding must be 'separate' or 'masked', got {group_decoding!r}"
            )
        self.backbone = backbone
        self.in_feature = in_feature
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.test_topk = test_topk
        self.group_decoding = group_decoding
        self.group_checkpoint = group_checkpoint
        self.use_focal = criterion.use_focal
        hidden_dim = transformer.d_model
        in_channels = backbone.output_shape()[in_feature].channels
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        self.position_encoding = PositionEmbeddingSine(
            hidden_dim // 2, temperature=position_temperature, normalize=True
        )
        self._build_detection_queries(hidden_dim)
        self.class_embed = class_head(hidden_dim, num_classes, self.use_focal)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        check_num_classes(cfg, "MODEL.DETR.NUM_CLASSES")
        d = cfg.MODEL.DETR
        matcher = HungarianMatcher(
            cost_class=d.COST_CLASS,
            cost_bbox=d.COST_BBOX,
            cost_giou=d.COST_GIOU,
            use_focal=d.USE_FOCAL_LOSS,
            focal_alpha=d.FOCAL_ALPHA,
            focal_gamma=d.FOCAL_GAMMA,
        )
        base = {"loss_class": d.CLASS_WEIGHT, "loss_bbox": d.BBOX_WEIGHT}
        base["loss_giou"] = d.GIOU_WEIGHT
        weight_dict = dict(base)
        if d.DEEP_SUPERVISION:
            for i in range(d.DEC_LAYERS - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        criterion = SetCriterion(
            d.NUM_CLASSES,
            matcher,
            weight_dict,
            eos_coef=d.NO_OBJECT_WEIGHT,
            use_focal=d.USE_FOCAL_LOSS,
            focal_alpha=d.FOCAL_ALPHA,
            focal_gamma=d.FOCAL_GAMMA,
        )
        return {
            "backbone": build_backbone(cfg),
            "in_feature": d.IN_FEATURE,
            "transformer": build_transformer(cfg, d.TRANSFORMER_NAME),
            "criterion": criterion,
            "num_classes": d.NUM_CLASSES,
            "num_queries": d.NUM_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": d.DEEP_SUPERVISION,
            "size_divisibility": d.SIZE_DIVISIBILITY,
            "position_temperature": d.POSITION_TEMPERATURE,
            "test_topk": d.TEST_TOPK,
            "group_decoding": d.GROUP_DECODING,
            "group_checkpoint": d.GROUP_CHECKPOINT,
            "class_head": class_head_factory(cfg),
        }

    def _build_detection_queries(self, hidden_dim: int) -> None:
        """Create the learned detection queries, called by :meth:`__init__` between the input
        projection and the heads. DETR: ``query_embed``, Q positional embeddings of width d."""
        self.query_embed = nn.Embedding(self.num_queries, hidden_dim)

    @property
    def device(self):
        return self.pixel_mean.device

    # ---------------------------------------------------------------- distillation interface
    # (kd_detr.distill.interface.DistillableDETR): what a teacher or student of KD-DETR provides.
    box_query_groups = False  # vanilla DETR decodes content / pos groups only, not boxes
    keep_backbone_features = False  # set by the KD trainer when a KD term reads them
    # Optional (not part of DistillableDETR): the decoder's self- and cross-attention are
    # standard multi-head attention whose weights forward_raw returns as "attention_maps" while
    # ``keep_attention_maps`` is set (the KD step sets it for its forward passes only when a KD
    # term reads them; D3ETR). Deformable DETR and DINO return their deformable
    # cross-attention's sampling weights scattered onto the memory tokens; RT-DETR and D-FINE
    # return none (False there).
    decoder_attention_maps = True
    keep_attention_maps = False

    @property
    def hidden_dim(self) -> int:
        """d, the width of the query features (``transformer.d_model``)."""
        return self.transformer.d_model

    def detection_query_content(self, batch_size: int, outputs: Dict) -> Optional[torch.Tensor]:
        """(B or 1, N, d) content vectors the detection queries start from, or None when the
        model has no box queries (vanilla DETR: the specific points of KD-DETR need them)."""
        return None

    # ---------------------------------------------------------------- Detectron2 entry point
    def forward(self, batched_inputs: List[Dict], extra_query_groups: Optional[List[Dict]] = None):
        """
        Args:
            batched_inputs: Detectron2 dataset dicts; "image" (C, H, W) in ``INPUT.FORMAT``,
                "instances" (training: gt_boxes in xyxy pixels of "image", gt_classes), optional
                "height"/"width" (evaluation: the original image size to rescale boxes to).
            extra_query_groups: optional extra query groups decoded with the detection queries
                (see :meth:`forward_raw`), e.g. distillation points. Going through ``forward``
                (not ``forward_raw``) keeps DistributedDataParallel's gradient sync.

        Returns:
            Training: dict of weighted ``loss_*`` scalars. Evaluation: one dict per image with
            "instances" (pred_boxes, scores, pred_classes) in original image coordinates.
            With ``extra_query_groups`` (even empty): a tuple of the above and the raw
            :meth:`forward_raw` outputs, whose "groups" entry holds the groups' per-layer outputs.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.forward_raw(images, extra_query_groups)
        if self.training:
            loss_dict = self.losses(
                outputs, self.prepare_targets(batched_inputs, images.image_sizes)
            )
            return loss_dict if extra_query_groups is None else (loss_dict, outputs)
        results = self.inference(outputs, images.image_sizes)
        processed = []
        for result, inputs, size in zip(results, batched_inputs, images.image_sizes):
            height, width = inputs.get("height", size[0]), inputs.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed if extra_query_groups is None else (processed, outputs)

    def preprocess_image(self, batched_inputs) -> ImageList:
        """Normalise and pad the images to an ImageList (padding value 0 after normalisation)."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    def prepare_targets(self, batched_inputs, image_sizes) -> List[Dict[str, torch.Tensor]]:
        """Per image, "labels" (T,) and "boxes" (T, 4) cxcywh normalised by the unpadded size."""
        targets = []
        for inputs, (h, w) in zip(batched_inputs, image_sizes):
            instances = inputs["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float() / scale)
            targets.append({"labels": instances.gt_classes.long(), "boxes": boxes})
        return targets

    # ---------------------------------------------------------------- raw model
    def encode(self, images: ImagesLike) -> Dict[str, torch.Tensor]:
        """Backbone + projection + encoder.

        Args:
            images: an ImageList of normalised images, or a tuple (tensor (B, 3, H, W) normalised
                and padded, mask (B, H, W) bool True on padding).

        Returns:
            dict: "memory" (B, S, d), "mask" (B, S) True on padding, "pos" (B, S, d) and
            "spatial_shape" (h, w) of the feature map (S = h * w); with
            ``keep_backbone_features``, "backbone_features" (the backbone's output dict).
        """
        if isinstance(images, ImageList):
            tensor, mask = images.tensor, padding_mask(images)
        else:
            tensor, mask = images
        backbone_features = self.backbone(tensor)
        features = backbone_features[self.in_feature]
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        pos = self.position_encoding(mask).to(features.dtype).flatten(2).transpose(1, 2)
        src = self.input_proj(features).flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        memory = self.transformer.encode(src, pos, mask)
        encoded = {"memory": memory, "mask": mask, "pos": pos, "spatial_shape": features.shape[-2:]}
        if self.keep_backbone_features:
            encoded["backbone_features"] = backbone_features
        return encoded

    def decode(self, encoded, queries: List[Tuple[torch.Tensor, torch.Tensor]]):
        """Decode query sets that do not attend to each other.

        Args:
            encoded (dict): output of :meth:`encode`.
            queries: list of (content (B, N_i, d), pos (B, N_i, d)).

        Returns:
            list[Tensor]: per query set, (L, B, N_i, d) decoder outputs; with
            ``keep_attention_maps`` per set a tuple (that, its attention maps: "self_attn"
            (L, B, heads, N_i, N_i), its own block, and "cross_attn" (L, B, heads, N_i, S)).
        """
        args = (encoded["memory"], encoded["pos"])
        need = self.keep_attention_maps
        if self.group_decoding == "separate" or len(queries) == 1:
            if need:
                return [
                    self.transformer.decode(c, *args, p, encoded["mask"], need_weights=True)
                    for c, p in queries
                ]
            return [self.transformer.decode(c, *args, p, encoded["mask"]) for c, p in queries]
        sizes = [c.shape[1] for c, _ in queries]
        blocked = torch.ones(sum(sizes), sum(sizes), dtype=torch.bool, device=self.device)
        start = 0
        for n in sizes:
            blocked[start : start + n, start : start + n] = False
            start += n
        content = torch.cat([c for c, _ in queries], dim=1)
        pos = torch.cat([p for _, p in queries], dim=1)
        if need:
            hs, maps = self.transformer.decode(
                content, *args, pos, encoded["mask"], self_attn_mask=blocked, need_weights=True
            )
            return list(zip(hs.split(sizes, dim=2), split_attention_maps(maps, sizes)))
        hs = self.transformer.decode(content, *args, pos, encoded["mask"], self_attn_mask=blocked)
        return list(hs.split(sizes, dim=2))

    def _decode_all(self, encoded, sets, denoising=None):
        """:meth:`decode` in the ``(per-set outputs, denoising outputs)`` form of
        :meth:`decode_query_sets`."""
        return self.decode(encoded, sets), None

    def decode_query_sets(self, decode: Callable, encoded, sets: List, denoising=None):
        """Decode the detection queries (``sets[0]``, with the optional denoising queries) and
        the extra query groups (``sets[1:]``).

        ``decode(encoded, sets, denoising) -> (per-set outputs, denoising outputs or None)``
        decodes them all at once. With ``group_checkpoint`` in training (with gradients and
        extra groups), the detection set is decoded first and each group in its own call under
        activation checkpointing: the groups' decoder activations are recomputed in the backward
        pass, one group at a time, instead of kept (the detection outputs are those of a pass
        without groups).
        """
        grouped = self.group_checkpoint and self.training and len(sets) > 1
        if not (grouped and torch.is_grad_enabled()):
            return decode(encoded, sets, denoising)
        first, dn = decode(encoded, sets[:1], denoising)
        if self.keep_attention_maps:  # the recomputation (in the backward) must return them too
            decode = self._keeping_attention_maps(decode)
        rest = []
        for group in sets[1:]:  # one checkpoint per group: the backward recomputes one at a time
            decoded, _ = checkpoint(decode, encoded, [group], None, use_reentrant=False)
            rest += list(decoded)
        return list(first) + rest, dn

    def _keeping_attention_maps(self, decode: Callable) -> Callable:
        """``decode`` run with ``keep_attention_maps`` set, whatever the flag is when it runs
        (an activation checkpoint recomputes it in the backward pass, after the KD step has
        restored the flag)."""

        def run(*args):
            saved = self.keep_attention_maps
            self.keep_attention_maps = True
            try:
                return decode(*args)
            finally:
                self.keep_attention_maps = saved

        return run

    def predict(self, hs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Heads: (..., d) -> logits (..., K) and sigmoid cxcywh boxes (..., 4)."""
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()

    def _parse_groups(self, groups, batch_size):
        """Validate extra query groups; returns [(content (B, M, d), pos (B, M, d))]."""
        d, name = self.transformer.d_model, type(self).__name__
        parsed = []
        for g, group in enumerate(groups):
            if not isinstance(group, Mapping):
                raise TypeError(f"extra query group {g} must be a dict, got {type(group).__name__}")
            if "boxes" in group:
                raise ValueError(
                    f"{name} has no box queries: extra query group {g} has 'boxes'. Vanilla DETR "
                    "accepts only 'content'/'pos' vectors of shape (B or 1, M, d); use "
                    "DAB-DETR, Deformable DETR or DINO to decode box (anchor) queries."
                )
            unknown = set(group) - {"content", "pos"}
            if unknown or not group:
                raise ValueError(
                    f"extra query group {g}: expected keys 'content' and/or 'pos', "
                    f"got {sorted(group)}"
                )
            tensors = {k: v for k, v in group.items() if v is not None}
            lengths = {v.shape[1] for v in tensors.values() if v.dim() == 3}
            for key, value in tensors.items():
                if value.dim() != 3 or value.shape[0] not in (1, batch_size) or value.shape[2] != d:
                    raise ValueError(
                        f"extra query group {g}: '{key}' must be (B={batch_size} or 1, M, d={d}), "
                        f"got {tuple(value.shape)}"
                    )
            if len(lengths) != 1:
                raise ValueError(
                    f"extra query group {g}: 'content' and 'pos' are both None or differ in M"
                )
            shape = (batch_size, lengths.pop(), d)
            content, pos = (tensors.get(k) for k in ("content", "pos"))
            parsed.append(
                tuple(
                    torch.zeros(shape, device=self.device) if t is None else t.expand(shape)
                    for t in (content, pos)
                )
            )
        return parsed

    def forward_raw(self, images: ImagesLike, extra_query_groups: Optional[List[Dict]] = None):
        """Raw outputs of every decoder layer for the detection queries and extra query groups.

        Args:
            images: ImageList of normalised images, or (tensor (B, 3, H, W), mask (B, H, W)).
            extra_query_groups: optional list of dicts {"content": (B|1, M, d), "pos": (B|1, M, d)}
                (either may be omitted: zeros). "boxes" raises ValueError (no box queries).

        Returns:
            dict with
              "pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4): last decoder layer (K = C + 1, or C
                with focal loss; boxes sigmoid-normalised cxcywh relative to the unpadded image);
              "aux_outputs": [{"pred_logits", "pred_boxes"}] for layers 0 .. L-2 (empty without
                deep supervision);
              "layers": {"pred_logits" (L, B, Q, K), "pred_boxes" (L, B, Q, 4),
                "hidden_states" (L, B, Q, d)} for every decoder layer;
              "groups": per extra group, {"pred_logits" (L, B, M, K), "pred_boxes" (L, B, M, 4),
                "hidden_states" (L, B, M, d)} (empty list without groups);
              "encoder": the dict returned by :meth:`encode`;
              with ``keep_attention_maps``, "attention_maps" (see :meth:`attention_outputs`).
        """
        encoded = self.encode(images)
        bsz = encoded["memory"].shape[0]
        groups = self._parse_groups(extra_query_groups or [], bsz)
        query_pos = self.query_embed.weight[None].expand(bsz, -1, -1)
        sets = [(torch.zeros_like(query_pos), query_pos)] + groups
        hs_all, _ = self.decode_query_sets(self._decode_all, encoded, sets)
        maps = None
        if self.keep_attention_maps:
            hs_all, maps = zip(*hs_all)
        per_set = []
        for hs in hs_all:
            logits, boxes = self.predict(hs)
            per_set.append({"pred_logits": logits, "pred_boxes": boxes, "hidden_states": hs})
        outputs = self._pack_outputs(per_set, encoded)
        if maps is not None:
            outputs["attention_maps"] = self.attention_outputs(maps)
        return outputs

    @staticmethod
    def attention_outputs(maps: Sequence[Dict]) -> Dict:
        """The "attention_maps" entry of :meth:`forward_raw` from the maps of every query set
        (the detection queries first, then the extra groups): {"layers": {"self_attn"
        (L, B, heads, Q, Q), "cross_attn" (L, B, heads, Q, S)}, "groups": [the same per extra
        group, (L, B, heads, M, M) and (L, B, heads, M, S)]}. Per head, every decoder layer;
        "self_attn" holds the set's own queries only (the block of its rows and columns: with
        the masks keeping sets apart, each row sums to 1 over it), "cross_attn" is over the S
        memory tokens of "encoder" (0 on padding). Denoising queries are left out."""
        return {"layers": maps[0], "groups": list(maps[1:])}

    def _pack_outputs(self, per_set: List[Dict], encoded: Dict) -> Dict:
        """:meth:`forward_raw` outputs from the per-layer outputs of every query set (the
        detection queries first, then the extra groups) and the :meth:`encode` dict."""
        layers = per_set[0]
        aux = [
            {"pred_logits": logits, "pred_boxes": boxes}
            for logits, boxes in zip(layers["pred_logits"][:-1], layers["pred_boxes"][:-1])
        ]
        return {
            "pred_logits": layers["pred_logits"][-1],
            "pred_boxes": layers["pred_boxes"][-1],
            "aux_outputs": aux if self.aux_loss else [],
            "layers": layers,
            "groups": per_set[1:],
            "encoder": encoded,
        }

    # ---------------------------------------------------------------- losses / inference
    def losses(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """Weighted detection losses of :meth:`forward_raw` outputs (extra groups ignored)."""
        loss_dict = self.criterion(outputs, targets)
        return {k: v * self.criterion.weight_dict[k] for k, v in loss_dict.items()}

    def inference(self, outputs, image_sizes) -> List[Instances]:
        """Top-k detections per image, in the coordinates of the (unpadded) network input.

        Softmax: per query, the best non-"no object" class; focal: top-k over (query, class).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_queries, num_logits = logits.shape[1:]
        if self.use_focal:
            prob = logits.sigmoid().flatten(1)  # (B, Q * C)
            k = prob.shape[1] if self.test_topk <= 0 else min(self.test_topk, prob.shape[1])
            scores, index = prob.topk(k, dim=1)
            query, labels = index // num_logits, index % num_logits
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (B, Q)
            k = num_queries if self.test_topk <= 0 else min(self.test_topk, num_queries)
            scores, query = scores.topk(k, dim=1)
            labels = labels.gather(1, query)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            box = box_cxcywh_to_xyxy(boxes[i, query[i]])
            box = box * torch.tensor([w, h, w, h], dtype=box.dtype, device=box.device)
            result = Instances((h, w))
            result.pred_boxes = Boxes(box)
            result.scores = scores[i]
            result.pred_classes = labels[i]
            results.append(result)
        return results
