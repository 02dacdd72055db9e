# Copyright (c) kd_detr contributors.
"""Export-friendly top-k post-processing of DETR-family raw outputs.

The same selection as :meth:`kd_detr.modeling.meta_arch.detr.DETR.inference` followed by
Detectron2's ``detector_postprocess`` rescale and clip, written with tensor ops only (no
``Instances``, no Python loop over images), so that it traces into ONNX / TorchScript with a
dynamic batch.
"""
from typing import Tuple

import torch

from ..modeling.box_ops import box_cxcywh_to_xyxy

__all__ = ["topk_detections"]


def topk_detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    orig_target_sizes: torch.Tensor,
    use_focal: bool,
    topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k detections per image in original-image pixels.

    Args:
        logits: (N, Q, K) class logits; K = C (sigmoid / focal) or C + 1 (softmax, the last
            logit is "no object").
        boxes: (N, Q, 4) sigmoid cxcywh boxes relative to the (unpadded) network input.
        orig_target_sizes: (N, 2) (width, height) of the original images (any numeric dtype).
        use_focal: sigmoid top-k over (query, class) pairs; else the best non-background class of
            each query by softmax, then top-k over queries.
        topk: detections kept per image (<= 0: every candidate).

    Returns:
        labels (N, k) int64, boxes (N, k, 4) xyxy in original pixels clipped to the image,
        scores (N, k) float, sorted by decreasing score.
    """
    num_queries, num_logits = logits.shape[1], logits.shape[2]
    if use_focal:
        prob = logits.sigmoid().flatten(1)  # (N, Q * C)
        total = num_queries * num_logits
        k = total if topk <= 0 else min(topk, total)
        scores, index = prob.topk(k, dim=1)
        query = torch.div(index, num_logits, rounding_mode="floor")
        labels = index - query * num_logits
    else:
        per_query, best = logits.softmax(-1)[..., :-1].max(-1)  # (N, Q)
        k = num_queries if topk <= 0 else min(topk, num_queries)
        scores, query = per_query.topk(k, dim=1)
        labels = best.gather(1, query)
    picked = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))  # (N, k, 4)
    xyxy = box_cxcywh_to_xyxy(picked)
    size = orig_target_sizes.to(xyxy.dtype)  # (N, 2) = (W, H)
    scale = size.repeat(1, 2).unsqueeze(1)  # (N, 1, 4) = (W, H, W, H)
    xyxy = torch.max(torch.min(xyxy * scale, scale), torch.zeros_like(scale))
    return labels, xyxy, scores
