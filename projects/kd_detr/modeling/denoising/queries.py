# Copyright (c) kd_detr contributors.
"""Denoising queries from ground truth: DN-DETR groups and DINO's contrastive (CDN) groups."""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .attention_mask import denoising_attention_mask
from .noise import noise_boxes, noise_boxes_contrastive, noise_labels

__all__ = ["DenoisingGenerator", "DenoisingQueries"]


@dataclass
class DenoisingQueries:
    """Denoising queries of a batch, laid out as G groups of ``group_size`` slots.

    Slot ``g * group_size + j`` (DN) holds a noised copy of ground-truth object j of its image;
    with contrastive denoising a group is [P positives | P negatives] (``group_size = 2P``), the
    negative copy of object j at ``g * group_size + P + j``. P is the largest object count of the
    batch; slots past an image's own count are padding (``valid`` False).

    Attributes:
        content (Tensor): (B, N, d) content queries (label embeddings), N = G * group_size.
        boxes (Tensor): (B, N, 4) noised cxcywh boxes in [0, 1] (the anchors).
        noised_labels (Tensor): (B, N) int64 label fed to the label embedding (padding: C).
        target_labels (Tensor): (B, N) int64 ground-truth label (padding: C).
        target_boxes (Tensor): (B, N, 4) ground-truth box (padding: zeros).
        valid (Tensor): (B, N) bool, real (non-padding) slots.
        positive (Tensor): (B, N) bool, valid slots that must reconstruct their object
            (negatives must predict "no object").
        num_groups (int): G.
        group_size (int): slots per group.
    """

    content: torch.Tensor
    boxes: torch.Tensor
    noised_labels: torch.Tensor
    target_labels: torch.Tensor
    target_boxes: torch.Tensor
    valid: torch.Tensor
    positive: torch.Tensor
    num_groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.group_size

    def attention_mask(self, num_matching: int, extra_sizes=()) -> torch.Tensor:
        """(B, N', N') self-attention mask of [these queries | matching | extra groups], see
        :func:`denoising_attention_mask`."""
        return denoising_attention_mask(
            self.num_groups,
            self.group_size,
            num_matching,
            extra_sizes,
            valid=self.valid,
            device=self.content.device,
        )


class DenoisingGenerator(nn.Module):
    """Label embedding plus the noising that turns ground truth into denoising queries.

    The label embedding has C + 1 rows, the last one meaning "no object". With
    ``with_indicator`` (DN-DAB-DETR) its width is d - 1 and one indicator channel is appended:
    1 for denoising queries, 0 for matching queries, whose content is then the "no object"
    embedding (see :meth:`matching_content`). Without it (DINO style) the width is d.

    Args:
        num_classes (int): C.
        hidden_dim (int): d, width of the content queries.
        num_groups (int): G, denoising groups (used when ``num_queries`` is 0).
        num_queries (int): if > 0, a budget instead of a fixed G: G = max(1, num_queries // P)
            with P the largest object count of the batch (contrastive denoising doubles the
            queries: each group also has P negatives), as DINO's ``dn_number``.
        label_noise_ratio (float): probability of resampling a label (see :func:`noise_labels`).
        box_noise_scale (float): lambda of the box noise.
        contrastive (bool): DINO's contrastive denoising (positive and negative queries).
        with_indicator (bool): append the denoising indicator channel (DN-DAB-DETR).
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_groups: int = 5,
        num_queries: int = 0,
        label_noise_ratio: float = 0.2,
        box_noise_scale: float = 0.4,
        contrastive: bool = False,
        with_indicator: bool = True,
    ):
        super().__init__()
        if num_groups < 1 and num_queries < 1:
            raise ValueError(
                f"Denoising needs num_groups >= 1 or num_queries >= 1, got {num_groups} and "
                f"{num_queries} (MODEL.DETR.DN.NUM_GROUPS / NUM_QUERIES)"
            )
        if not 0 <= label_noise_ratio <= 1:
            raise ValueError(f"label_noise_ratio must be in [0, 1], got {label_noise_ratio}")
        if box_noise_scale < 0:
            raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_groups = num_groups
        self.num_queries = num_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.contrastive = contrastive
        self.with_indicator = with_indicator
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - int(with_indicator))

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, num_groups={self.num_groups}, "
            f"num_queries={self.num_queries}, label_noise_ratio={self.label_noise_ratio}, "
            f"box_noise_scale={self.box_noise_scale}, contrastive={self.contrastive}, "
            f"with_indicator={self.with_indicator}"
        )

    def embed_labels(self, labels: torch.Tensor, indicator: float = 1.0) -> torch.Tensor:
        """(...,) labels in [0, C] -> (..., d) content queries."""
        content = self.label_enc(labels)
        if self.with_indicator:
            flag = content.new_full(content.shape[:-1] + (1,), indicator)
            content = torch.cat([content, flag], dim=-1)
        return content

    def matching_content(self, num_queries: int) -> torch.Tensor:
        """(Q, d) content of the matching queries: the "no object" embedding, indicator 0."""
        device = self.label_enc.weight.device
        no_object = torch.full((num_queries,), self.num_classes, dtype=torch.long, device=device)
        return self.embed_labels(no_object, indicator=0.0)

    def resolve_num_groups(self, max_objects: int) -> int:
        """G for a batch whose largest image has ``max_objects`` objects."""
        if self.num_queries > 0:
            return max(1, self.num_queries // max(max_objects, 1))
        return self.num_groups

    def forward(
        self,
        targets: List[Dict[str, torch.Tensor]],
        generator: Optional[torch.Generator] = None,
    ) -> Optional[DenoisingQueries]:
        """
        Args:
            targets: per image, "labels" (T_i,) int64 and "boxes" (T_i, 4) normalised cxcywh.
            generator: optional source of randomness (tests).

        Returns:
            DenoisingQueries, or None when the batch has no object.
        """
        device = self.label_enc.weight.device
        counts = [len(t["labels"]) for t in targets]
        max_objects = max(counts, default=0)
        if max_objects == 0:
            return None
        bsz, num_groups = len(targets), self.resolve_num_groups(max_objects)
        kinds = 2 if self.contrastive else 1
        group_size = kinds * max_objects
        num_slots = num_groups * group_size
        # Start of every (group g, kind k) block, g-major; object j of an image sits at start + j.
        starts = torch.arange(num_groups, device=device)[:, None] * group_size
        starts = (starts + torch.arange(kinds, device=device) * max_objects).flatten()
        is_negative = (torch.arange(kinds, device=device) == 1).repeat(num_groups)
        image_idx, slot_idx, labels, boxes, negative = [], [], [], [], []
        for b, (t, count) in enumerate(zip(targets, counts)):
            slots = (starts[:, None] + torch.arange(count, device=device)).flatten()
            image_idx.append(torch.full_like(slots, b))
            slot_idx.append(slots)
            labels.append(t["labels"].to(device).repeat(len(starts)))
            boxes.append(t["boxes"].to(device=device, dtype=torch.float32).repeat(len(starts), 1))
            negative.append(is_negative.repeat_interleave(count))
        image_idx, slot_idx = torch.cat(image_idx), torch.cat(slot_idx)
        labels, boxes, negative = torch.cat(labels).long(), torch.cat(boxes), torch.cat(negative)
        noised_labels = noise_labels(labels, self.label_noise_ratio, self.num_classes, generator)
        if self.contrastive:
            noised_boxes = noise_boxes_contrastive(boxes, self.box_noise_scale, negative, generator)
        else:
            noised_boxes = noise_boxes(boxes, self.box_noise_scale, generator)

        def scatter(values, fill, shape_tail=()):
            out = values.new_full((bsz, num_slots) + shape_tail, fill)
            out[image_idx, slot_idx] = values
            return out

        noised = scatter(noised_labels, self.num_classes)
        valid = scatter(torch.ones_like(negative), False)
        content = self.embed_labels(noised) * valid[..., None]  # padding content: zeros
        return DenoisingQueries(
            content=content,
            boxes=scatter(noised_boxes, 0.5, (4,)),
            noised_labels=noised,
            target_labels=scatter(labels, self.num_classes),
            target_boxes=scatter(boxes, 0.0, (4,)),
            valid=valid,
            positive=scatter(~negative, False),
            num_groups=num_groups,
            group_size=group_size,
        )
