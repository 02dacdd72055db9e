# Copyright (c) kd_detr contributors.
"""Open-vocabulary class head of DETR-family detectors (``MODEL.DETR.CLASS_HEAD region_text``).

The linear ``class_embed`` that DETR and DAB-DETR apply to every decoder layer's query features
becomes a :class:`RegionTextClassifier` over a swappable vocabulary of text embeddings, so the
logits keep the layout the matcher, the set criterion, top-k inference and the KD losses expect:
(..., C) sigmoid logits for focal-loss models (background "none"), (..., C + 1) with the
"no object" logit last for softmax DETR (background "zero" or "learned"). C is the size of the
current vocabulary: the training one in train mode, the test one (if set) in eval mode.
"""
import logging
import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..modeling.class_head import CLASS_HEAD_REGISTRY
from ..utils import expand_data_path
from .region_text_classifier import RegionTextClassifier
from .text_embeddings import load_text_embeddings
from .vocabulary import dataset_vocabularies

__all__ = ["QueryTextClassifier", "build_region_text_class_head", "set_detr_vocabulary"]

logger = logging.getLogger(__name__)

_FOCAL_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # logit of the prior probability 0.01


class QueryTextClassifier(RegionTextClassifier):
    """:class:`RegionTextClassifier` on query features of any leading shape.

    ``forward``: (..., D_in) -> (..., K), e.g. decoder outputs (L, B, N, d) -> (L, B, N, K)
    with K = C (background "none") or C + 1 (background last).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


def _vocabularies(cfg) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """(train (C, D), test (C', D) or None, whether the train rows follow DATASETS.TRAIN[0])."""
    ov = cfg.MODEL.OV
    dim = ov.EMBED_DIM
    train_path = expand_data_path(ov.TEXT_EMBEDDINGS)
    test_path = expand_data_path(ov.TEST_TEXT_EMBEDDINGS)
    if not train_path:
        raise ValueError(
            "MODEL.DETR.CLASS_HEAD region_text needs class text embeddings: set "
            "MODEL.OV.TEXT_EMBEDDINGS "
            "(a .npy from tools/build_text_embeddings.py or Detic's *_clip_a+cname.npy)"
        )
    if not ov.DETR_HEAD.VOCABULARY_FROM_DATASETS:
        train = load_text_embeddings(train_path, expected_dim=dim)
        test = load_text_embeddings(test_path, expected_dim=dim) if test_path else None
        return train, test, True
    train, test = dataset_vocabularies(cfg, "MODEL.OV.DETR_HEAD.VOCABULARY_FROM_DATASETS", False)
    if train is None:
        return test, None, False
    return train, test, True


@CLASS_HEAD_REGISTRY.register(name="region_text")
def build_region_text_class_head(
    cfg, input_dim: int, num_classes: int, use_focal: bool
) -> nn.Module:
    """The open-vocabulary class head of a DETR-family model (``MODEL.DETR.CLASS_HEAD
    region_text``): a :class:`QueryTextClassifier` over ``MODEL.OV.*``'s vocabularies.

    Args:
        cfg: config with ``MODEL.OV`` (``add_kd_detr_config``).
        input_dim: query feature size d.
        num_classes: C, ``MODEL.DETR.NUM_CLASSES``: the training vocabulary's size.
        use_focal: the model's criterion uses the sigmoid focal loss (no background logit).

    Focal-loss heads get a learnable logit bias initialised to ``MODEL.OV.BIAS_INIT``, or to
    logit(0.01) when it is None (the prior of DAB-DETR's linear head).

    Raises:
        ValueError: for a background mode the loss cannot use, a training vocabulary whose size
            differs from ``MODEL.DETR.NUM_CLASSES``, or unusable text embeddings.
    """
    ov = cfg.MODEL.OV
    if use_focal and ov.BACKGROUND != "none":
        raise ValueError(
            f"MODEL.OV.BACKGROUND is {ov.BACKGROUND!r} but this model uses the sigmoid focal loss, "
            "which has no background logit: set MODEL.OV.BACKGROUND none"
        )
    if not use_focal and ov.BACKGROUND == "none":
        raise ValueError(
            "Softmax DETR needs a 'no object' logit: set MODEL.OV.BACKGROUND zero (RegionCLIP / "
            "Detic) or learned (ViLD)"
        )
    if ov.USE_FED_LOSS:
        raise ValueError(
            "MODEL.OV.USE_FED_LOSS is for ROI heads; DETR heads are trained by the set criterion "
            "(MODEL.DETR.*): set MODEL.OV.USE_FED_LOSS False"
        )
    train, test, from_train_set = _vocabularies(cfg)
    if from_train_set and len(train) != num_classes:
        raise ValueError(
            f"The training vocabulary has {len(train)} classes but MODEL.DETR.NUM_CLASSES is "
            f"{num_classes}: set MODEL.DETR.NUM_CLASSES {len(train)}"
        )
    bias = ov.BIAS_INIT
    if use_focal and bias is None:
        bias = _FOCAL_PRIOR_BIAS
    head = QueryTextClassifier(
        input_dim,
        train,
        test_text_embeddings=test,
        temperature=ov.TEMPERATURE,
        background=ov.BACKGROUND,
        bias_init=bias,
        loss="sigmoid" if use_focal else "softmax",
    )
    logger.info(
        f"Open-vocabulary DETR class head: {len(train)} training classes, "
        f"{len(test) if test is not None else len(train)} test classes, text dim {train.shape[1]}"
    )
    return head


def set_detr_vocabulary(model: nn.Module, embeddings: torch.Tensor, split: Optional[str] = None):
    """Swap the vocabulary of a DETR-family model with the open-vocabulary head.

    Args:
        model: a DETR-family model built with ``MODEL.DETR.CLASS_HEAD region_text``.
        embeddings: (C, D) text embeddings, D = the head's text dimension.
        split: None (both modes), "train" or "test" (see
            :meth:`RegionTextClassifier.set_vocabulary`).

    The set criterion (and ``model.num_classes``) follow a new training vocabulary, so softmax
    DETR's "no object" class stays the last logit.

    Raises:
        TypeError: when the model has no open-vocabulary head.
        ValueError: when the embedding size differs from the head's.
    """
    head = getattr(model, "class_embed", None)
    if not isinstance(head, RegionTextClassifier):
        raise TypeError(
            f"{type(model).__name__} has no open-vocabulary class head: build it with "
            "MODEL.DETR.CLASS_HEAD region_text"
        )
    head.set_vocabulary(embeddings, split)
    if split == "test":
        return
    num_classes = len(head.train_vocabulary)
    model.num_classes = num_classes
    criterion = model.criterion
    criterion.num_classes = num_classes
    weight = torch.ones(num_classes + 1, device=criterion.empty_weight.device)
    weight[-1] = criterion.eos_coef
    criterion.empty_weight = weight
