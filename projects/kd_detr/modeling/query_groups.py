# Copyright (c) kd_detr contributors.
"""Extra query groups of box-query models (DAB-DETR, Deformable DETR, DINO, RT-DETR, D-FINE):
validation, and the layout of the query sets decoded together in one pass.

A group is ``{"boxes": (B or 1, M, 4) cxcywh in [0, 1], "content": optional (B or 1, M, d)}``;
a leading 1 is shared by every image of the batch.
"""
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["block_diagonal_mask", "check_box_group", "joint_query_pass"]


def block_diagonal_mask(sizes: List[int], device=None) -> torch.Tensor:
    """(N, N) bool self-attention mask, N = sum(sizes), True (blocked) outside the diagonal
    blocks, so that each consecutive run of ``sizes[i]`` queries attends only to itself."""
    group = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes))
    return group[:, None] != group[None, :]


def joint_query_pass(
    queries: Sequence[Tuple[torch.Tensor, torch.Tensor]], group_decoding: str, denoising=None
):
    """The query sets one decoder pass decodes together and their layout.

    Args:
        queries: per set (content (B, N_i, d), boxes (B, N_i, 4)), the detection set first.
        group_decoding (str): "masked": every set in the pass; "separate": the detection set only
            (the caller decodes the others in their own passes).
        denoising: optional ``DenoisingQueries`` put first in the pass.

    Returns:
        tuple: content (B, N, d), boxes (B, N, 4), the sizes of the parts (the denoising queries
        first when given), the self-attention mask (the denoising mask composed with the group
        blocks, a block-diagonal mask, or None for one set), and how many of ``queries`` the
        pass holds.
    """
    joint = queries if group_decoding == "masked" else queries[:1]
    sizes = [c.shape[1] for c, _ in joint]
    contents, boxes = [c for c, _ in joint], [b for _, b in joint]
    if denoising is not None:
        contents.insert(0, denoising.content.to(contents[0].dtype))
        boxes.insert(0, denoising.boxes.to(boxes[0].dtype))
        mask = denoising.attention_mask(sizes[0], sizes[1:])
        sizes.insert(0, denoising.num_queries)
    else:
        mask = block_diagonal_mask(sizes, boxes[0].device) if len(sizes) > 1 else None
    return torch.cat(contents, 1), torch.cat(boxes, 1), sizes, mask, len(joint)


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
