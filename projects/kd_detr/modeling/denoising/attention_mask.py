# Copyright (c) kd_detr contributors.
"""Decoder self-attention masks that keep denoising queries from leaking into the others."""
from typing import Optional, Sequence

import torch

__all__ = ["denoising_attention_mask"]


def denoising_attention_mask(
    num_groups: int,
    group_size: int,
    num_matching: int,
    extra_sizes: Sequence[int] = (),
    valid: Optional[torch.Tensor] = None,
    device=None,
) -> torch.Tensor:
    """Self-attention mask for [denoising groups | matching queries | extra query groups].

    The query order is ``num_groups`` denoising groups of ``group_size`` queries, then the
    ``num_matching`` matching (detection) queries, then one block per entry of ``extra_sizes``
    (e.g. distillation groups). True means "may not attend", as in ``nn.MultiheadAttention``:

    * a denoising group sees itself and the matching queries (DN-DETR), no other group;
    * the matching queries see only themselves (they never see the ground truth);
    * every extra group sees only itself, and nobody else sees it.

    Args:
        num_groups (int): G denoising groups.
        group_size (int): queries per denoising group (padded to the batch maximum).
        num_matching (int): Q matching queries.
        extra_sizes (Sequence[int]): sizes of the extra query groups.
        valid (Tensor): optional (B, G * group_size) bool, False on padded denoising slots; they
            are then also hidden as keys, so an image's denoising outputs do not depend on how
            many objects the other images of the batch have.
        device: device of the result.

    Returns:
        Tensor: (N, N) bool, or (B, N, N) when ``valid`` is given, N = G * group_size + Q +
        sum(extra_sizes).
    """
    sizes = [group_size] * num_groups + [num_matching] + list(extra_sizes)
    counts = torch.tensor(sizes, device=device)
    block = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
    blocked = block[:, None] != block[None, :]
    num_dn = num_groups * group_size
    blocked[:num_dn, num_dn : num_dn + num_matching] = False  # denoising sees matching
    if valid is None:
        return blocked
    if valid.shape[1] != num_dn:
        raise ValueError(
            f"valid must be (B, {num_dn}) for {num_groups} groups of {group_size}, "
            f"got {tuple(valid.shape)}"
        )
    hidden_keys = torch.zeros(valid.shape[0], blocked.shape[0], dtype=torch.bool, device=device)
    hidden_keys[:, :num_dn] = ~valid.to(device)
    return blocked[None] | hidden_keys[:, None, :]
