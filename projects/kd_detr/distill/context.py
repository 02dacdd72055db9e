# Copyright (c) kd_detr contributors.
"""``KDContext``: everything a KD term may read for one training batch.

A term declares in ``inputs`` which of :data:`KD_INPUTS` it reads; the trainer fills only what
some configured term declared, so a run with KD-DETR's point terms alone computes nothing more
than the points.
"""
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import torch

__all__ = ["KD_INPUTS", "KDContext", "PointPair", "encoder_memory"]

# What a KD term may declare in ``inputs``:
#   "points": ``pairs``, the paired point groups (KD-DETR and the paper's baselines);
#   "targets": ``targets``, the ground truth of the batch in the student's classes;
#   "matching": ``student_matching`` / ``teacher_matching``, the Hungarian matching of each model's
#       final-layer detection outputs to ``targets`` (implies "targets");
#   "backbone_features": ``outputs["encoder"]["backbone_features"]`` of both models (the models
#       keep them only when asked);
#   "encoder_memory": :func:`encoder_memory` of both models (always available, nothing to keep);
#   "distributions": the paired point groups also carry both models' box distributions
#       (implies "points"; models with "pred_corners", e.g. D-FINE, see :class:`PointPair`);
#   "detections": ``teacher_detections``, the teacher's detection-query outputs of every decoder
#       layer with its logits in the student's class space (DETR-specific methods that match
#       the student's detection queries to the teacher's, e.g. DETRDistill, QSKD);
#   "attention": ``outputs["attention_maps"]`` of both models, every decoder layer's self- and
#       cross-attention weights of the detection queries and of every extra group (the models
#       keep them only for the KD step's forward passes, and only when asked; models with
#       ``decoder_attention_maps``: DETR, DAB-DETR, Deformable DETR, DINO; see
#       :meth:`KDContext.attention_maps`).
KD_INPUTS = (
    "points", "targets", "matching", "backbone_features", "encoder_memory", "distributions",
    "detections", "attention",
)  # fmt: skip


class PointPair(NamedTuple):
    """One paired point group.

    Attributes:
        name (str): the group's name in the loss keys ("general", "specific", "inconsistent", ...).
        student (dict): the student's outputs at the M points, every decoder layer:
            "pred_logits" (L, B, M, K), "pred_boxes" (L, B, M, 4) normalised cxcywh, optional
            "hidden_states" (L, B, M, d_s) and "reference_boxes" (L, B, M, 4).
        teacher (dict): the teacher's targets at the same points, final layer, detached:
            "pred_logits" (B, M, K) in the student's class space, "pred_boxes" (B, M, 4),
            optional "hidden_states" (B, M, d_t).
        weights (Tensor or None): (B, M) point weights (foreground rebalance), detached; None
            means all ones.

    With the "distributions" input both dicts also hold the box distributions of models that
    predict them (D-FINE's fine-grained distribution refinement): student "pred_corners"
    (L, B, M, 4 (R_s + 1)) logits of the (left, top, right, bottom) edge distances of every
    layer, teacher "pred_corners" (B, M, 4 (R_t + 1)) of its final layer (detached); each with
    "initial_boxes" (B, M, 4) cxcywh, the boxes the distances are measured from (detached), and
    "corner_offsets" (R + 1,), the distance each bin stands for from the centre of that box in
    units of its width (left / right) or height (top / bottom) (the model's ``corner_offsets()``).
    """

    name: str
    student: Dict[str, torch.Tensor]
    teacher: Dict[str, torch.Tensor]
    weights: Optional[torch.Tensor]


def encoder_memory(outputs: Dict) -> Dict:
    """The encoder memory of a model's ``forward_raw`` outputs in one layout for every model:
    "memory" (B, S, d), "padding_mask" (B, S) True on padding, "spatial_shapes" list of (h, w)
    per feature level (sum of h * w = S)."""
    encoded = outputs["encoder"]
    shapes = encoded.get("spatial_shapes")
    if shapes is None:
        shapes = [tuple(int(v) for v in encoded["spatial_shape"])]
    else:
        shapes = [tuple(int(v) for v in shape) for shape in shapes]
    return {"memory": encoded["memory"], "padding_mask": encoded["mask"], "spatial_shapes": shapes}


@dataclass
class KDContext:
    """The distillation inputs of one batch, passed to every KD term (``KD_LOSS_REGISTRY``).

    Always set: ``iteration``, ``batched_inputs`` (the Detectron2 dataset dicts), ``image_sizes``
    (unpadded (h, w) of the network inputs), ``student_outputs`` / ``teacher_outputs`` (both
    models' ``forward_raw`` outputs; the student's carry gradients, the teacher's do not) and
    ``teacher_softmax``. The other fields are filled when some term's ``inputs`` asks for them
    (see :data:`KD_INPUTS`), else left empty / None.

    Attributes:
        pairs (list[PointPair]): "points".
        targets (list[dict] or None): "targets": per image "labels" (T,) in the student's
            classes and "boxes" (T, 4) normalised cxcywh.
        student_matching, teacher_matching (list[tuple] or None): "matching": per image
            (query indices (n,), target indices (n,)) of each model's final detection layer.
        teacher_detections (dict or None): "detections": the teacher's detection queries at
            every decoder layer, detached: "pred_logits" (L_t, B, N, K) in the student's class
            space (softmax teachers: unmapped classes folded into the background at T = 1),
            "pred_boxes" (L_t, B, N, 4) cxcywh, "hidden_states" (L_t, B, N, d_t).
        inputs (frozenset[str]): every input some term declared (what the pairing adds to the
            pairs depends on it, e.g. "distributions").
    """

    iteration: int
    batched_inputs: List[Dict]
    image_sizes: List[Tuple[int, int]]
    student_outputs: Dict
    teacher_outputs: Dict
    teacher_softmax: bool
    pairs: List[PointPair] = field(default_factory=list)
    targets: Optional[List[Dict[str, torch.Tensor]]] = None
    student_matching: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    teacher_matching: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    teacher_detections: Optional[Dict[str, torch.Tensor]] = None
    inputs: FrozenSet[str] = frozenset()

    def backbone_features(self, role: str) -> Dict[str, torch.Tensor]:
        """"backbone_features": the backbone output dict of the "student" or the "teacher"."""
        outputs = self.student_outputs if role == "student" else self.teacher_outputs
        features = outputs["encoder"].get("backbone_features")
        if features is None:
            raise RuntimeError(
                f"The {role}'s backbone features were not kept: the KD term must declare "
                "'backbone_features' in its inputs"
            )
        return features

    def attention_maps(self, role: str) -> Dict:
        """"attention": the decoder attention maps of the "student" or the "teacher" (the
        teacher's detached): {"layers": {"self_attn" (L, B, heads, Q, Q), "cross_attn"
        (L, B, heads, Q, S)} of the detection queries, "groups": the same per extra group, in
        the order of ``outputs["groups"]``}; per head, each row a softmax over the set's own
        queries / the S memory tokens of :func:`encoder_memory` (0 on padding)."""
        outputs = self.student_outputs if role == "student" else self.teacher_outputs
        maps = outputs.get("attention_maps")
        if maps is None:
            raise RuntimeError(
                f"The {role}'s decoder attention maps were not kept: the KD term must declare "
                "'attention' in its inputs (and the model must have decoder_attention_maps)"
            )
        if role == "student":
            return maps
        detach = lambda d: {k: v.detach() for k, v in d.items()}  # noqa: E731
        return {"layers": detach(maps["layers"]), "groups": [detach(g) for g in maps["groups"]]}

    def encoder_memory(self, role: str) -> Dict:
        """"encoder_memory" of the "student" or the "teacher" (see :func:`encoder_memory`)."""
        outputs = self.student_outputs if role == "student" else self.teacher_outputs
        return encoder_memory(outputs)
