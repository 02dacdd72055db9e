# Copyright (c) kd_detr contributors.
"""``KD_LOSS_REGISTRY``: knowledge-distillation loss terms as plug-ins, and their builder."""
from torch import nn

from detectron2.utils.registry import Registry

__all__ = ["KD_LOSS_REGISTRY", "build_kd_losses"]

KD_LOSS_REGISTRY = Registry("KD_LOSS")
KD_LOSS_REGISTRY.__doc__ = """
Registry of knowledge-distillation loss terms. One call contract for every term, so that new KD
methods (DKD, multi-level logit KD, CTKD, feature KD, ...) plug in without touching the trainer.

Construction:
    ``KD_LOSS_REGISTRY.get(name)(cfg)`` for every name in ``cfg.MODEL.KD.LOSSES`` (see
    :func:`build_kd_losses`). A term is a :class:`~kd_detr.distill.term.KDTerm` (an
    ``nn.Module``; it may own parameters, e.g. a learnable temperature or feature adapters, which
    the trainer optimises and checkpoints as "kd_losses", never in the teacher) with a
    ``@configurable`` ``__init__``: it reads its settings from ``cfg.MODEL.KD.*`` (plus model
    keys it documents) or from keyword arguments.

Binding:
    ``term.bind(student, teacher)`` is called once with both models before the term's parameters
    join the optimizer: parameters that depend on the models' shapes (feature adapters) are
    created there, and a term whose inputs a model cannot provide stops with an error naming
    the term and what is missing.

Declaration:
    ``inputs`` (class attribute): the subset of ``KD_INPUTS`` the term reads from the context:
    "points" (paired point groups), "targets" (ground truth), "matching" (Hungarian matching of
    each model to the ground truth), "backbone_features", "encoder_memory", "distributions"
    (the point pairs also carry both models' box distributions, see below; implies "points"),
    "detections" (the teacher's detection queries at every decoder layer, logits in the
    student's class space), "attention" (both models' decoder attention maps, kept for the KD
    step's forward passes only; ``KDContext.attention_maps``).
    The trainer computes or keeps only what some configured term declared, so KD-DETR's step
    costs what it costs alone; it checks at start-up that both models can provide it (and that
    the pairing ``provides`` "distributions").

Call, once per batch:
    ``term(context) -> Dict[str, Tensor]`` with ``context`` a
    :class:`~kd_detr.distill.context.KDContext`. Terms on paired points derive from
    :class:`~kd_detr.distill.term.PointKDTerm` and implement
    ``pair_losses(student, teacher, weights, group)`` per point group:

    student (dict): the student's outputs on the group's M points, every decoder layer, first to
        last: "pred_logits" (L, B, M, K), "pred_boxes" (L, B, M, 4) normalised cxcywh; optional
        "hidden_states" (L, B, M, d_s) and "reference_boxes" (L, B, M, 4). A (B, M, .) tensor
        counts as L = 1.
    teacher (dict): the teacher's targets on the same points, its final decoder layer only,
        detached: "pred_logits" (B, M, K), "pred_boxes" (B, M, 4); optional "hidden_states"
        (B, M, d_t). Logits are already in the student's class space (see ``class_mapping``), so
        K agrees (C for sigmoid models, C + 1 with background last for softmax models).
    weights (Tensor or None): (B, M) per-point weights (foreground rebalance), detached;
        None means all ones.
    With "distributions" (models with distribution box heads, e.g. D-FINE, which have a
        ``corner_offsets()`` method; a term reading them checks it in ``bind``): student
        "pred_corners" (L, B, M, 4 (R_s + 1)) edge-distribution logits of every layer, teacher
        "pred_corners" (B, M, 4 (R_t + 1)) of its final layer, detached; both with
        "initial_boxes" (B, M, 4) cxcywh, the boxes the edge distances are measured from
        (detached), and "corner_offsets" (R + 1,), the distance of each bin from that box's
        centre in units of its width / height (see ``PointPair``).
    group (str): the group's name, used in the loss keys.

Returns:
    dict of scalar tensors, only losses: ``loss_kd_<term>_<group>`` for the student's last layer
    and ``loss_kd_<term>_<group>_<l>`` for layer l = 0 .. L-2 (the suffix rule of the detection
    aux losses); terms without groups use ``loss_kd_<term>[_<what>]``. Values are already
    multiplied by the term's own weights (e.g. ``MODEL.KD.CLS_WEIGHT``): the trainer only sums
    them (optionally times a global KD schedule factor) and needs no weight dict. Keys must not
    repeat those of other terms or of the detection losses. Metrics go to the EventStorage,
    never into the dict.

Rules:
    Gradients flow to the student tensors (and the term's own parameters) only. A term may use
    collectives (e.g. all-reducing a normaliser), so it must be called on every rank the same
    number of times in the same order, also when M = 0.
"""


def build_kd_losses(cfg) -> nn.ModuleList:
    """Build the terms named in ``cfg.MODEL.KD.LOSSES``, in order (a ModuleList, so parameters
    of learnable terms can be registered and optimised)."""
    return nn.ModuleList(KD_LOSS_REGISTRY.get(name)(cfg) for name in cfg.MODEL.KD.LOSSES)
