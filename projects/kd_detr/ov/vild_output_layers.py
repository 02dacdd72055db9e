# Copyright (c) kd_detr contributors.
"""ViLD box predictor: class-agnostic box regression + the region-text classifier (ViLD-text),
and the ViLD-ensemble score."""
import json
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import (
    FastRCNNOutputLayers,
    _log_classification_stats,
    fast_rcnn_inference,
)
from detectron2.structures import Instances

from ..utils import expand_data_path
from .region_text_classifier import RegionTextClassifier
from .vocabulary import dataset_vocabularies

__all__ = ["ViLDOutputLayers", "base_class_mask", "load_novel_category_mask", "vild_ensemble"]


def vild_ensemble(
    text_probs: torch.Tensor, image_probs: torch.Tensor, base_mask: torch.Tensor, weight=2 / 3
) -> torch.Tensor:
    """ViLD-ensemble class scores (geometric mean of the two branches).

    Args:
        text_probs: (N, C) class probabilities of the text branch.
        image_probs: (N, C) class probabilities of the image branch.
        base_mask: (C,) bool, True for base (seen) classes.
        weight: w; base classes get ``p_text^w * p_image^(1-w)``, novel ones
            ``p_text^(1-w) * p_image^w`` (ViLD: w = 2/3).

    Returns:
        (N, C) ensembled scores.
    """
    if text_probs.shape != image_probs.shape or base_mask.shape != text_probs.shape[1:]:
        raise ValueError(
            f"ViLD ensemble shapes disagree: text {tuple(text_probs.shape)}, image "
            f"{tuple(image_probs.shape)}, base mask {tuple(base_mask.shape)}"
        )
    w_text = torch.where(base_mask, weight, 1.0 - weight).to(text_probs)
    return text_probs.pow(w_text) * image_probs.pow(1.0 - w_text)


def base_class_mask(
    test_vocabulary: torch.Tensor, train_vocabulary: torch.Tensor, atol: float = 1e-4
) -> torch.Tensor:
    """(C_test,) bool: True for test classes whose (unit) embedding is a training-vocabulary row."""
    cos = test_vocabulary @ train_vocabulary.t()
    return (cos.max(dim=1).values >= 1.0 - atol) if cos.numel() else cos.new_zeros(0).bool()


def load_novel_category_mask(path: str) -> torch.Tensor:
    """(C,) bool, True for the rare ("r") classes of an LVIS-style categories json, by id order.

    Args:
        path: a cat_info list of categories, or a dict with "categories" (an LVIS json).
    """
    with open(path) as f:
        data = json.load(f)
    cats = data["categories"] if isinstance(data, dict) else data
    if not cats or any("frequency" not in c for c in cats):
        raise ValueError(
            f"{path} must list categories with a 'frequency' (r/c/f) each, like LVIS's json or "
            "Detic's lvis_v1_train_cat_info.json (MODEL.OV.VILD.NOVEL_CATEGORIES)"
        )
    return torch.tensor([c["frequency"] == "r" for c in sorted(cats, key=lambda c: c["id"])])


def _with_expanded_paths(cfg):
    """A copy of cfg whose OV file paths may start with $KD_DETR_SHARED_DATA (expanded)."""
    cfg = cfg.clone()
    cfg.defrost()
    ov = cfg.MODEL.OV
    ov.TEXT_EMBEDDINGS = expand_data_path(ov.TEXT_EMBEDDINGS)
    ov.TEST_TEXT_EMBEDDINGS = expand_data_path(ov.TEST_TEXT_EMBEDDINGS)
    ov.VILD.NOVEL_CATEGORIES = expand_data_path(ov.VILD.NOVEL_CATEGORIES)
    return cfg


class ViLDOutputLayers(FastRCNNOutputLayers):
    """Fast R-CNN outputs with a :class:`RegionTextClassifier` as ``cls_score``.

    Box regression is class-agnostic, so the vocabulary can change between training and test.
    ``num_classes`` follows the classifier's vocabulary of the current mode. Classes marked
    novel in a vocabulary get a -inf logit in the training loss; at inference, with
    ``ensemble``, the text-branch probabilities are combined with image-branch embeddings by
    :func:`vild_ensemble`.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        box2box_transform,
        classifier: RegionTextClassifier,
        novel_category_mask: Optional[torch.Tensor] = None,
        ensemble: bool = False,
        ensemble_weight: float = 2 / 3,
        **kwargs,
    ):
        """
        Args:
            input_shape, box2box_transform, kwargs: as for ``FastRCNNOutputLayers`` (whose
                ``num_classes`` is the classifier's training vocabulary size).
            classifier: the region-text classifier (its input size is the box feature size).
            novel_category_mask: (K,) bool, novel (rare) classes of a K-class vocabulary:
                applies to every vocabulary with K classes (None: none, and at inference the
                novel classes are the test classes missing from the training vocabulary).
            ensemble: combine text and image probabilities (ViLD-ensemble) at inference.
            ensemble_weight: w of :func:`vild_ensemble`.
        """
        kwargs["cls_agnostic_bbox_reg"] = True
        super().__init__(
            input_shape,
            box2box_transform=box2box_transform,
            num_classes=classifier.train_vocabulary.shape[0],
            **kwargs,
        )
        del self.cls_score
        self.cls_score = classifier
        self.register_buffer("novel_category_mask", novel_category_mask, persistent=False)
        self.ensemble = ensemble
        self.ensemble_weight = float(ensemble_weight)

    @property
    def num_classes(self) -> int:
        """Classes of the current mode's vocabulary."""
        return self.cls_score.num_classes

    @num_classes.setter
    def num_classes(self, value):
        pass  # FastRCNNOutputLayers.__init__ assigns it; the vocabulary decides

    @classmethod
    def from_config(cls, cfg, input_shape):
        if not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            raise ValueError(
                "ViLD regresses boxes class-agnostically (the test vocabulary differs from the "
                "training one): set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True"
            )
        cfg = _with_expanded_paths(cfg)
        vild = cfg.MODEL.OV.VILD
        classifier_args = RegionTextClassifier.from_config(cfg, input_shape)
        if vild.VOCABULARY_FROM_DATASETS:
            train, test = dataset_vocabularies(cfg, "MODEL.OV.VILD.VOCABULARY_FROM_DATASETS", True)
            classifier_args.update(text_embeddings=train, test_text_embeddings=test)
        num_train = classifier_args["text_embeddings"].shape[0]
        if num_train != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"The training vocabulary ({cfg.MODEL.OV.TEXT_EMBEDDINGS}) has {num_train} classes "
                f"but MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}: set it to "
                f"{num_train}, or give embeddings of the training dataset's classes"
            )
        novel = load_novel_category_mask(vild.NOVEL_CATEGORIES) if vild.NOVEL_CATEGORIES else None
        if vild.ENSEMBLE and vild.IMAGE_BRANCH != "separate":
            raise ValueError(
                "MODEL.OV.VILD.ENSEMBLE needs MODEL.OV.VILD.IMAGE_BRANCH 'separate' (ViLD-ensemble "
                "scores regions with a second, image-distilled branch)"
            )
        return {
            "input_shape": input_shape,
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS),
            "classifier": RegionTextClassifier(**classifier_args),
            "novel_category_mask": novel,
            "ensemble": vild.ENSEMBLE,
            "ensemble_weight": vild.ENSEMBLE_WEIGHT,
            "smooth_l1_beta": cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA,
            "test_score_thresh": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "test_nms_thresh": cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "box_reg_loss_type": cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE,
            "loss_weight": {"loss_box_reg": cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT},
        }

    def novel_mask(self) -> torch.Tensor:
        """(C,) bool novel classes of the current vocabulary."""
        vocab = self.cls_score.vocabulary
        mask = self.novel_category_mask
        if mask is not None and mask.numel() == vocab.shape[0]:
            return mask.to(vocab.device)
        if vocab is self.cls_score.train_vocabulary:
            return torch.zeros(vocab.shape[0], dtype=torch.bool, device=vocab.device)
        return ~base_class_mask(vocab, self.cls_score.train_vocabulary)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised projected region embeddings of (N, ...) box features."""
        return F.normalize(self.cls_score.proj(torch.flatten(x, start_dim=1)), dim=1)

    def image_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, C) image-branch probabilities: softmax over the classes (no background) of the
        cosine between (N, D) unit embeddings and the vocabulary, over the temperature."""
        logits = embeddings @ self.cls_score.vocabulary.t() / self.cls_score.temperature
        return F.softmax(logits, dim=1)

    def losses(self, predictions, proposals: List[Instances]):
        """Classification loss of the region-text classifier (novel classes masked) and
        Detectron2's class-agnostic box regression loss."""
        scores, proposal_deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=scores.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        _log_classification_stats(scores, gt_classes)
        novel = self.novel_mask()
        if novel.any():
            scores = scores.clone()
            scores[:, : len(novel)][:, novel] = float("-inf")
        losses = {
            "loss_cls": self.cls_score.losses(scores, gt_classes)["loss_cls"],
            "loss_box_reg": self.box_reg_loss(
                proposal_boxes, gt_boxes, proposal_deltas, gt_classes
            ),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def predict_probs(self, predictions, proposals: List[Instances]):
        """Per image (R_i, C + 1) probabilities, background last (a zero column for sigmoid)."""
        scores, _ = predictions
        probs = self.cls_score.predict_probs(scores)
        if probs.shape[1] == self.num_classes:
            probs = torch.cat([probs, probs.new_zeros(len(probs), 1)], dim=1)
        return probs.split([len(p) for p in proposals], dim=0)

    def inference(
        self,
        predictions: Tuple[torch.Tensor, torch.Tensor],
        proposals: List[Instances],
        image_embeddings: Optional[torch.Tensor] = None,
    ):
        """Detectron2's ``fast_rcnn_inference``; with ``ensemble``, on ViLD-ensemble scores.

        Args:
            image_embeddings: (R, D) unit embeddings of the image branch for the same proposals.
        """
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        if self.ensemble:
            if image_embeddings is None:
                raise ValueError("ViLD-ensemble inference needs the image-branch embeddings")
            probs = torch.cat(scores, dim=0)
            num = self.num_classes
            ens = vild_ensemble(
                probs[:, :num], self.image_probs(image_embeddings), ~self.novel_mask(),
                self.ensemble_weight,
            )  # fmt: skip
            probs = torch.cat([ens, probs[:, num:]], dim=1)
            scores = probs.split([len(p) for p in proposals], dim=0)
        image_shapes = [x.image_size for x in proposals]
        return fast_rcnn_inference(
            boxes,
            scores,
            image_shapes,
            self.test_score_thresh,
            self.test_nms_thresh,
            self.test_topk_per_image,
        )
