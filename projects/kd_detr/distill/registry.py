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
    :func:`build_kd_losses`). A term is an ``nn.Module`` (it may own parameters, e.g. a learnable
    temperature, which the trainer then optimises) with a ``@configurable`` ``__init__``: it reads
    its settings from ``cfg.MODEL.KD.*`` (plus model keys it documents) or from keyword arguments.

Call, once per distillation point group (e.g. "general", "specific"):
    ``term(student, teacher, weights, group) -> Dict[str, Tensor]``

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
    group (str): the group's name, used in the loss keys.

Returns:
    dict of scalar tensors, only losses: ``loss_kd_<term>_<group>`` for the student's last layer
    and ``loss_kd_<term>_<group>_<l>`` for layer l = 0 .. L-2 (the suffix rule of the detection
    aux losses). Values are already multiplied by the term's own weights (e.g.
    ``MODEL.KD.CLS_WEIGHT``): the trainer only sums them (optionally times a global KD schedule
    factor) and needs no weight dict. Metrics go to the EventStorage, never into the dict.

Rules:
    Gradients flow to the student tensors only. A term may use collectives (e.g. all-reducing a
    normaliser), so it must be called on every rank the same number of times in the same order,
    also when M = 0.
"""


def build_kd_losses(cfg) -> nn.ModuleList:
    """Build the terms named in ``cfg.MODEL.KD.LOSSES``, in order (a ModuleList, so parameters
    of learnable terms can be registered and optimised)."""
    return nn.ModuleList(KD_LOSS_REGISTRY.get(name)(cfg) for name in cfg.MODEL.KD.LOSSES)
