# Copyright (c) kd_detr contributors.
"""Validation of extra query groups of box-query models (DAB-DETR, Deformable DETR, DINO).

A group is ``{"boxes": (B or 1, M, 4) cxcywh in [0, 1], "content": optional (B or 1, M, d)}``;
a leading 1 is shared by every image of the batch.
"""
from typing import Mapping, Optional, Tuple

import torch

__all__ = ["check_box_group"]


def check_box_group(
    group, index: int, batch_size: int, hidden_dim: int, model_name: str
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check one extra query group and broadcast its content to the batch.

    Args:
        group (dict): the group.
        index (int): its position in the list of groups (for error messages).
        batch_size (int): B.
        hidden_dim (int): d, the model's transformer width.
        model_name (str): the model, named in error messages.

    Returns:
        tuple: boxes (B or 1, M, 4) as given, content (B, M, d) or None when absent.

    Raises:
        TypeError / ValueError: naming the group, the expected and the given shapes.
    """
    if not isinstance(group, Mapping):
        raise TypeError(f"extra query group {index} must be a dict, got {type(group).__name__}")
    if set(group) - {"boxes", "content"} or group.get("boxes") is None:
        raise ValueError(
            f"extra query group {index}: {model_name} expects 'boxes' (B or 1, M, 4) and optional "
            f"'content' (B or 1, M, d); got keys {sorted(group)} (positional queries are "
            "computed from the boxes)"
        )
    boxes, content = group["boxes"], group.get("content")
    if boxes.dim() != 3 or boxes.shape[0] not in (1, batch_size) or boxes.shape[2] != 4:
        raise ValueError(
            f"extra query group {index}: 'boxes' must be (B={batch_size} or 1, M, 4), "
            f"got {tuple(boxes.shape)}"
        )
    if content is None:
        return boxes, None
    shape = (batch_size, boxes.shape[1], hidden_dim)
    if (
        content.dim() != 3
        or content.shape[0] not in (1, batch_size)
        or content.shape[1:] != shape[1:]
    ):
        raise ValueError(
            f"extra query group {index}: 'content' must be (B={batch_size} or 1, "
            f"M={shape[1]}, d={hidden_dim}), got {tuple(content.shape)}"
        )
    return boxes, content.expand(shape)
