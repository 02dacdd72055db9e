# Copyright (c) kd_detr contributors.
"""Foreground rebalance (FRW) weights of distillation points, from the teacher's logits.

A point's weight is the teacher's highest foreground probability there, so points on objects
count more than background points. Weights are computed without gradient and detached.
"""
from typing import Optional, Sequence

import torch

__all__ = ["foreground_weights", "sigmoid_foreground_weights", "softmax_foreground_weights"]


def _as_index(class_index, device):
    if class_index is None:
        return None
    return torch.as_tensor(class_index, dtype=torch.int64, device=device)


@torch.no_grad()
def sigmoid_foreground_weights(logits, class_index: Optional[Sequence[int]] = None):
    """w_i = max_c sigmoid(z[i, c]) for sigmoid (focal) teachers (official KD-DETR).

    Args:
        logits (Tensor): (..., C) teacher logits, final decoder layer.
        class_index (Sequence[int] or None): teacher classes to take the max over (the student's
            classes under a class mapping); None: all C.

    Returns:
        Tensor: (...,) float32 weights in (0, 1), detached.
    """
    index = _as_index(class_index, logits.device)
    logits = logits.detach().float()
    if index is not None:
        logits = logits.index_select(-1, index)
    return logits.sigmoid().amax(-1)


@torch.no_grad()
def softmax_foreground_weights(logits, class_index: Optional[Sequence[int]] = None):
    """w_i = max over non-background classes of softmax(z[i]) for softmax teachers.

    Args:
        logits (Tensor): (..., C + 1) teacher logits, background last, final decoder layer.
        class_index (Sequence[int] or None): foreground classes to take the max over (the
            student's classes under a class mapping); None: all C. The softmax is always over all
            C + 1 logits, so the weight is a probability of the full teacher.

    Returns:
        Tensor: (...,) float32 weights in (0, 1), detached.
    """
    prob = logits.detach().float().softmax(-1)
    index = _as_index(class_index, logits.device)
    prob = prob[..., :-1] if index is None else prob.index_select(-1, index)
    return prob.amax(-1)


def foreground_weights(logits, softmax: bool, class_index: Optional[Sequence[int]] = None):
    """Dispatch to :func:`softmax_foreground_weights` or :func:`sigmoid_foreground_weights`.

    Args:
        logits (Tensor): (..., K) teacher logits (K = C + 1 if ``softmax`` else C).
        softmax (bool): the teacher is a softmax classifier with a background logit.
        class_index (Sequence[int] or None): see the two functions.

    Returns:
        Tensor: (...,) float32 weights, detached.
    """
    if softmax:
        return softmax_foreground_weights(logits, class_index)
    return sigmoid_foreground_weights(logits, class_index)
