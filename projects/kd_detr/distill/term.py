# Copyright (c) kd_detr contributors.
"""Base classes of KD loss terms (``KD_LOSS_REGISTRY``'s call contract)."""
from typing import Dict, FrozenSet, Optional

import torch
from torch import nn

from .context import KD_INPUTS, KDContext

__all__ = ["KDTerm", "PointKDTerm"]


class KDTerm(nn.Module):
    """A KD loss term: ``term(context) -> {"loss_kd_...": scalar}``.

    Subclasses set ``inputs``, the subset of :data:`~kd_detr.distill.context.KD_INPUTS` they
    read from the :class:`~kd_detr.distill.context.KDContext`, and implement :meth:`forward`.
    """

    inputs: FrozenSet[str] = frozenset()
    # Learning-rate factor of the term's own parameters (their optimizer group gets
    # SOLVER.BASE_LR x lr_factor, no weight decay); a term may set it from its config.
    lr_factor: float = 1.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = set(cls.inputs) - set(KD_INPUTS)
        if unknown:
            raise TypeError(f"{cls.__name__}.inputs has unknown entries {sorted(unknown)}")

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Called once with both (unwrapped) models before training, before the term's
        parameters join the optimizer: create parameters that depend on the models' shapes
        (e.g. feature adapters) and check the models provide what the term reads (raise a
        ValueError naming the term and what is missing)."""

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class PointKDTerm(KDTerm):
    """A term evaluated once per paired point group (KD-DETR and its baselines): subclasses
    implement :meth:`pair_losses`; :meth:`forward` calls it for every pair, in order."""

    inputs = frozenset({"points"})

    def forward(self, context: KDContext) -> Dict[str, torch.Tensor]:
        losses = {}
        for pair in context.pairs:
            losses.update(self.pair_losses(pair.student, pair.teacher, pair.weights, pair.name))
        return losses

    def pair_losses(
        self,
        student: Dict[str, torch.Tensor],
        teacher: Dict[str, torch.Tensor],
        weights: Optional[torch.Tensor],
        group: str,
    ) -> Dict[str, torch.Tensor]:
        """Losses of one point group (see :class:`~kd_detr.distill.context.PointPair`)."""
        raise NotImplementedError
