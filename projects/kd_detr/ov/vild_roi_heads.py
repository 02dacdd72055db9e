# Copyright (c) kd_detr contributors.
"""ViLD ROI heads: ViLD-text classification, ViLD-image distillation, RegionCLIP-style
region-concept alignment, ViLD-ensemble inference."""
import contextlib
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads, build_box_head
from detectron2.structures import Boxes, Instances

from .regionclip import RegionConceptAlignment
from .vild_config import regionclip_enabled
from .vild_output_layers import ViLDOutputLayers

__all__ = ["ViLDROIHeads", "vild_image_loss"]

IMAGE_BRANCHES = ("shared", "separate")


def vild_image_loss(region_embeddings: torch.Tensor, clip_embeddings: torch.Tensor) -> torch.Tensor:
    """ViLD-image L1 distillation loss.

    Args:
        region_embeddings: (M, D) L2-normalised projected region embeddings.
        clip_embeddings: (M, D) CLIP image embeddings of the same regions (normalised here).

    Returns:
        Scalar: the L1 norm of the difference per region, averaged over the M regions (ViLD's
        mean absolute difference times D); 0 (connected to the graph) when M = 0.
    """
    if len(region_embeddings) == 0:
        return region_embeddings.sum() * 0.0
    target = F.normalize(clip_embeddings.to(region_embeddings), dim=1)
    return (region_embeddings - target).abs().sum(dim=1).mean()


@ROI_HEADS_REGISTRY.register()
class ViLDROIHeads(StandardROIHeads):
    """StandardROIHeads with a :class:`ViLDOutputLayers` box predictor.

    Training adds ``loss_vild_image`` (weight ``image_loss_weight``) on the regions given with
    :meth:`distill_regions` (``ViLDRCNN`` passes the ones the data loader attached): they are
    pooled like proposals and embedded by the text branch ("shared", ViLD) or by a second box
    head and projection ("separate", ViLD-ensemble, whose image-branch embeddings also score the
    proposals at inference when the predictor ensembles).

    With a ``region_alignment`` (``MODEL.OV.REGIONCLIP.*_WEIGHT > 0``), the same region
    embeddings also get RegionCLIP's ``loss_regionclip_contrastive`` and
    ``loss_regionclip_distill``: the cached CLIP embeddings of the regions are the teacher, whose
    concept scores give the pseudo labels.
    """

    @configurable
    def __init__(
        self,
        *,
        image_loss_weight: float = 0.0,
        image_box_head: Optional[nn.Module] = None,
        image_projection: Optional[nn.Module] = None,
        region_alignment: Optional[RegionConceptAlignment] = None,
        **kwargs,
    ):
        """
        Args:
            image_loss_weight: weight of the ViLD-image loss (0: none).
            image_box_head, image_projection: the separate image branch (None: "shared").
            region_alignment: RegionCLIP losses on the distilled regions (None: off).
            kwargs: as for ``StandardROIHeads``; ``box_predictor`` is a ViLDOutputLayers.
        """
        super().__init__(**kwargs)
        if not isinstance(self.box_predictor, ViLDOutputLayers):
            raise TypeError(f"ViLDROIHeads needs ViLDOutputLayers, got {type(self.box_predictor)}")
        if (image_box_head is None) != (image_projection is None):
            raise ValueError("The separate image branch needs both a box head and a projection")
        if self.box_predictor.ensemble and image_box_head is None:
            raise ValueError("ViLD-ensemble inference needs the separate image branch")
        if self.train_on_pred_boxes:
            raise ValueError("ViLDROIHeads does not support MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES")
        self.image_loss_weight = float(image_loss_weight)
        self.image_box_head = image_box_head
        self.image_projection = image_projection
        self.region_alignment = region_alignment
        self._distill_regions = None

    @property
    def uses_distill_regions(self) -> bool:
        """True when training needs :meth:`distill_regions` (ViLD-image or RegionCLIP losses)."""
        return self.image_loss_weight > 0 or self.region_alignment is not None

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        box_head = ret["box_head"]
        ret["box_predictor"] = ViLDOutputLayers(cfg, box_head.output_shape)
        vild = cfg.MODEL.OV.VILD
        if vild.IMAGE_BRANCH not in IMAGE_BRANCHES:
            raise ValueError(
                f"MODEL.OV.VILD.IMAGE_BRANCH must be one of {IMAGE_BRANCHES}, got "
                f"{vild.IMAGE_BRANCH!r}"
            )
        ret["image_loss_weight"] = vild.IMAGE_LOSS_WEIGHT
        if vild.IMAGE_BRANCH == "separate":
            resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
            channels = input_shape[ret["box_in_features"][0]].channels
            pooled = ShapeSpec(channels=channels, height=resolution, width=resolution)
            ret["image_box_head"] = build_box_head(cfg, pooled)
            out = ret["image_box_head"].output_shape
            in_dim = out.channels * (out.width or 1) * (out.height or 1)
            ret["image_projection"] = nn.Linear(in_dim, cfg.MODEL.OV.EMBED_DIM)
        if regionclip_enabled(cfg):
            concepts = None  # MODEL.OV.REGIONCLIP.CONCEPT_EMBEDDINGS, else the training classes
            if not cfg.MODEL.OV.REGIONCLIP.CONCEPT_EMBEDDINGS:
                concepts = ret["box_predictor"].cls_score.train_vocabulary.detach().clone()
            ret["region_alignment"] = RegionConceptAlignment(cfg, concepts=concepts)
        return ret

    @contextlib.contextmanager
    def distill_regions(self, regions: List[Instances]):
        """Use ``regions`` (per image: ``proposal_boxes`` and (M_i, D) ``clip_embeds``) as the
        ViLD-image targets of the forward passes inside the ``with`` block."""
        self._distill_regions = regions
        try:
            yield
        finally:
            self._distill_regions = None

    def _image_embeddings(self, features: List[torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """(sum M_i, D) normalised image-branch embeddings of per-image boxes."""
        pooled = self.box_pooler(features, boxes)
        if self.image_box_head is None:
            return self.box_predictor.embed(self.box_head(pooled))
        x = torch.flatten(self.image_box_head(pooled), start_dim=1)
        return F.normalize(self.image_projection(x), dim=1)

    def _region_losses(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """ViLD-image and RegionCLIP losses on the regions given to :meth:`distill_regions`."""
        regions = self._distill_regions
        if regions is None:
            raise ValueError(
                "MODEL.OV.VILD.IMAGE_LOSS_WEIGHT > 0 and MODEL.OV.REGIONCLIP.*_WEIGHT > 0 need "
                "CLIP region targets: use MODEL.META_ARCHITECTURE 'ViLDRCNN' with kd_detr's "
                "Trainer (train_net.py), whose data loader attaches them, or set those weights 0"
            )
        embeddings = self._image_embeddings(features, [r.proposal_boxes for r in regions])
        targets = torch.cat([r.clip_embeds for r in regions], dim=0)
        if targets.shape[1:] != embeddings.shape[1:]:
            raise ValueError(
                f"CLIP region embeddings have dimension {targets.shape[1]} but the model's "
                f"projection {embeddings.shape[1]} (MODEL.OV.EMBED_DIM): precompute them with "
                "the CLIP model whose text embeddings the model uses"
            )
        losses = {}
        if self.image_loss_weight > 0:
            loss = vild_image_loss(embeddings, targets)
            losses["loss_vild_image"] = loss * self.image_loss_weight
        if self.region_alignment is not None:
            losses.update(self.region_alignment(embeddings, targets.to(embeddings).detach()))
        return losses

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """Losses (training) or detections (inference) of the box branch."""
        features = [features[f] for f in self.box_in_features]
        boxes = [x.proposal_boxes for x in proposals]
        predictions = self.box_predictor(self.box_head(self.box_pooler(features, boxes)))
        if self.training:
            losses = self.box_predictor.losses(predictions, proposals)
            if self.uses_distill_regions:
                losses.update(self._region_losses(features))
            return losses
        image_embeddings = None
        if self.box_predictor.ensemble:
            image_embeddings = self._image_embeddings(features, boxes)
        pred_instances, _ = self.box_predictor.inference(predictions, proposals, image_embeddings)
        return pred_instances
