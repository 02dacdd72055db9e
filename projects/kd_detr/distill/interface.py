# Copyright (c) kd_detr contributors.
"""``DistillableDETR``: what a model must provide to be a teacher or student of the distillation
layer, and ``check_distillable``, the start-up check naming what is missing.

DETR, DAB-DETR, Deformable DETR and DINO (``kd_detr.modeling``) implement it; the models live in
a lower layer, so they implement it structurally (same names and signatures) and
``tests/test_distill_interface.py`` checks each against this protocol.
"""
from typing import Dict, List, Optional, Protocol, runtime_checkable

import torch

from detectron2.structures import ImageList

__all__ = ["DistillableDETR", "check_distillable", "missing_members"]


@runtime_checkable
class DistillableDETR(Protocol):
    """A DETR-family model that decodes extra query groups (distillation points).

    Attributes:
        box_query_groups (bool): the model decodes box groups ``{"boxes": (B|1, M, 4) cxcywh,
            "content": optional (B|1, M, d)}`` (DAB-DETR, Deformable DETR, DINO); False:
            content / pos groups only (vanilla DETR), so no consistent distillation points.
        keep_backbone_features (bool): when set, :meth:`forward_raw` keeps the backbone's output
            dict in ``outputs["encoder"]["backbone_features"]`` (feature KD terms).
        use_focal (bool): sigmoid (focal) class logits (K = C), else softmax (K = C + 1).
        hidden_dim (int): d, the query feature width.
        criterion: the set criterion; ``criterion.matcher`` matches outputs to ground truth.

    Optional (not part of the protocol): models predicting box distributions (D-FINE) have
    ``corner_offsets() -> (R + 1,)`` and "pred_corners" / "initial_boxes" in their layer and
    group outputs; KD terms reading the "distributions" input check for it in ``bind``.
    Models whose decoders use standard multi-head attention (DETR, DAB-DETR) have
    ``decoder_attention_maps = True`` and return, while ``keep_attention_maps`` is set (the KD
    step sets it for its forward passes when a term declares "attention"), every decoder
    layer's self- and cross-attention weights in ``outputs["attention_maps"]``; KD terms reading
    them check ``decoder_attention_maps`` in ``bind`` (Deformable DETR, DINO: False).
    """

    box_query_groups: bool
    keep_backbone_features: bool
    use_focal: bool
    hidden_dim: int
    criterion: torch.nn.Module

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalised, padded images of a batch of Detectron2 dataset dicts."""

    def prepare_targets(self, batched_inputs: List[Dict], image_sizes) -> List[Dict]:
        """Per image "labels" (T,) and "boxes" (T, 4) cxcywh normalised by the unpadded size."""

    def forward_raw(self, images, extra_query_groups: Optional[List[Dict]] = None) -> Dict:
        """Raw outputs: "pred_logits" / "pred_boxes" (B, Q, .) of the final layer, "layers"
        (every layer, (L, B, Q, .), with "reference_boxes" for box-query models), "groups" (the
        same per extra group, in order) and "encoder" ("memory" (B, S, d), "mask" (B, S), ...)."""

    def detection_query_content(self, batch_size: int, outputs: Dict) -> Optional[torch.Tensor]:
        """(B or 1, N, d) content vectors the detection queries of ``outputs`` started from, or
        None without box queries."""


def missing_members(model) -> List[str]:
    """Names of :class:`DistillableDETR` members that ``model`` lacks (empty: it conforms)."""
    names = [n for n in DistillableDETR.__annotations__] + [
        n for n in ("preprocess_image", "prepare_targets", "forward_raw", "detection_query_content")
    ]
    return [n for n in names if not hasattr(model, n)]


def check_distillable(model, role: str, *, box_groups: bool = False, what: str = "") -> None:
    """Stop with a clear error when ``model`` cannot take part in distillation.

    Args:
        model: the (unwrapped) teacher or student.
        role (str): "teacher" or "student", named in the error.
        box_groups (bool): the model must decode box groups (consistent distillation points).
        what (str): what asks for it, named in the error (e.g. "MODEL.KD.POINTS consistent").

    Raises:
        TypeError: the model lacks members of :class:`DistillableDETR`.
        ValueError: ``box_groups`` is asked for and the model decodes no box groups.
    """
    name = type(model).__name__
    missing = missing_members(model)
    if missing:
        raise TypeError(
            f"The {role} ({name}) cannot be distilled by kd_detr's DETR distillation layer: it "
            f"lacks {', '.join(missing)} of the DistillableDETR interface "
            "(kd_detr.distill.interface). Use a DETR, DAB-DETR, Deformable DETR or DINO "
            f"{role}, or implement the interface."
        )
    if box_groups and not model.box_query_groups:
        raise ValueError(
            f"The {role} ({name}) has no box queries to decode distillation points"
            f"{f' ({what})' if what else ''}: use a DAB-DETR, Deformable DETR or DINO {role}, or "
            "a baseline MODEL.KD.POINTS mode (inconsistent, similar_foreground, similar_general)."
        )
