# Copyright (c) kd_detr contributors.
"""Tracing the open-vocabulary DETR class head (``kd_detr.ov.detr_ov_head``) with a dynamic batch.

``RegionTextClassifier.forward`` builds the "zero" background logit with
``logits.new_zeros(len(logits), 1)``: the tracer freezes ``len(logits)`` (N * Q of the traced
batch) into the graph, so another batch size fails. :func:`traceable_text_heads` swaps, for the
duration of an export only, the ``forward`` of every :class:`QueryTextClassifier` for the same
computation written with batch-free shapes; the vocabulary the head holds in eval mode (its test
vocabulary, if set) becomes graph constants.
"""
import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..ov.detr_ov_head import QueryTextClassifier

__all__ = ["traceable_text_heads"]


def _traceable_forward(head: QueryTextClassifier, x: torch.Tensor) -> torch.Tensor:
    """(..., D_in) -> (..., K), as ``QueryTextClassifier.forward``."""
    lead = x.shape[:-1]
    z = F.normalize(head.proj(x.reshape(-1, x.shape[-1])), dim=1)
    logits = z @ head.vocabulary.t() / head.temperature
    if head.bias is not None:
        logits = logits + head.bias
    if head.background == "learned":
        bg = z @ F.normalize(head.bg_embedding, dim=0) / head.temperature
        logits = torch.cat([logits, bg[:, None]], dim=1)
    elif head.background == "zero":
        logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
    return logits.reshape(*lead, -1)


@contextlib.contextmanager
def traceable_text_heads(module: nn.Module):
    """Within the context, the open-vocabulary class heads inside ``module`` trace with a
    dynamic batch (see the module docstring); restored afterwards."""
    heads = [m for m in module.modules() if isinstance(m, QueryTextClassifier)]
    for head in heads:
        head.forward = types.MethodType(_traceable_forward, head)
    try:
        yield heads
    finally:
        for head in heads:
            del head.forward
