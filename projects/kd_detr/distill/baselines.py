# Copyright (c) kd_detr contributors.
"""Pairings of the paper's weaker KD baselines (inconsistent distillation points).

Each function pairs the student's detection-query predictions (every decoder layer) with the
teacher's final-layer detection predictions and returns ``(student, teacher)`` dicts in the
``KD_LOSS_REGISTRY`` format, so the same KD terms apply: student "pred_logits" (L, B', N, K) and
"pred_boxes" (L, B', N, 4); teacher "pred_logits" (B', N, K) and "pred_boxes" (B', N, 4). Point
weights are then computed from the paired teacher logits (``weights.foreground_weights``).

* :func:`inconsistent_pairs`: query q of the student with query q of the teacher.
* :func:`similar_foreground_pairs`: each model Hungarian-matched to the ground truth; one pair
  per ground-truth object (student's match, teacher's match).
* :func:`similar_general_pairs`: the above plus one pair per image: the mean of each model's
  unmatched predictions.

Teacher logits must already be in the student's class space (``class_mapping``): the ground
truth uses the student's labels.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["inconsistent_pairs", "similar_foreground_pairs", "similar_general_pairs"]

Pairs = Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]


def _student(outputs) -> Tuple[torch.Tensor, torch.Tensor]:
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    return (logits[None], boxes[None]) if logits.dim() == 3 else (logits, boxes)


def _teacher(outputs) -> Tuple[torch.Tensor, torch.Tensor]:
    logits, boxes = outputs["pred_logits"].detach(), outputs["pred_boxes"].detach()
    return (logits[-1], boxes[-1]) if logits.dim() == 4 else (logits, boxes)


def inconsistent_pairs(student: Dict, teacher: Dict) -> Pairs:
    """Pair detection queries by index (the paper's "inconsistent" baseline).

    With different query counts, only the first ``min(Q_s, Q_t)`` queries of each model are
    paired; the others are not distilled.

    Args:
        student (dict): "pred_logits" (L, B, Q_s, K), "pred_boxes" (L, B, Q_s, 4).
        teacher (dict): "pred_logits" (B, Q_t, K), "pred_boxes" (B, Q_t, 4), or all layers
            (L_t, B, Q_t, .) of which the last is used.

    Returns:
        tuple[dict, dict]: student (L, B, M, .) and teacher (B, M, .), M = min(Q_s, Q_t).
    """
    s_logits, s_boxes = _student(student)
    t_logits, t_boxes = _teacher(teacher)
    m = min(s_logits.shape[2], t_logits.shape[1])
    return (
        {"pred_logits": s_logits[:, :, :m], "pred_boxes": s_boxes[:, :, :m]},
        {"pred_logits": t_logits[:, :m], "pred_boxes": t_boxes[:, :m]},
    )


def _matches(s_logits, s_boxes, t_logits, t_boxes, targets, matcher, teacher_matcher):
    """Per image: teacher query per paired object (n,), student query per layer and paired
    object (L, n), the matched query sets of every student layer and of the teacher, and the
    paired objects' ground-truth indices (n,)."""
    t_idx = teacher_matcher({"pred_logits": t_logits, "pred_boxes": t_boxes}, targets)
    s_idx = [
        matcher({"pred_logits": s_logits[layer], "pred_boxes": s_boxes[layer]}, targets)
        for layer in range(s_logits.shape[0])
    ]
    per_image = []
    for b in range(len(targets)):
        t_map = dict(zip(t_idx[b][1].tolist(), t_idx[b][0].tolist()))  # object -> query
        s_maps = [dict(zip(idx[b][1].tolist(), idx[b][0].tolist())) for idx in s_idx]
        objects = sorted(set(t_map).intersection(*s_maps))  # matched by every model and layer
        per_image.append(
            (
                [t_map[g] for g in objects],
                [[s_map[g] for g in objects] for s_map in s_maps],
                [set(s_map.values()) for s_map in s_maps],
                set(t_map.values()),
                objects,
            )
        )
    return per_image


def similar_foreground_pairs(
    student: Dict,
    teacher: Dict,
    targets: List[Dict[str, torch.Tensor]],
    matcher: nn.Module,
    teacher_matcher: Optional[nn.Module] = None,
) -> Pairs:
    """Pair the two models' predictions matched to the same ground-truth object.

    Every student layer and the teacher's final layer are Hungarian-matched to the ground truth
    independently (as their detection losses do). Objects left unmatched by some model (more
    objects than queries) are skipped. All images' pairs are concatenated into one row (B' = 1),
    image by image, objects in ground-truth order.

    Args:
        student (dict): "pred_logits" (L, B, Q_s, K), "pred_boxes" (L, B, Q_s, 4).
        teacher (dict): "pred_logits" (B, Q_t, K), "pred_boxes" (B, Q_t, 4) (or all layers).
        targets (list[dict]): per image, "labels" (T_b,) and "boxes" (T_b, 4) normalised cxcywh.
        matcher (nn.Module): the student's ``HungarianMatcher``.
        teacher_matcher (nn.Module or None): the teacher's (e.g. softmax vs focal cost); None:
            ``matcher``.

    Returns:
        tuple[dict, dict]: student (L, 1, N, .), teacher (1, N, .), N = matched objects; the
        teacher dict also holds "gt_labels" (1, N), each pair's ground-truth class (-1 for the
        background pairs of :func:`similar_general_pairs`).
    """
    return _pairs(student, teacher, targets, matcher, teacher_matcher, general=False)


def similar_general_pairs(
    student: Dict,
    teacher: Dict,
    targets: List[Dict[str, torch.Tensor]],
    matcher: nn.Module,
    teacher_matcher: Optional[nn.Module] = None,
) -> Pairs:
    """:func:`similar_foreground_pairs` plus one background pair per image.

    The extra pair of image b is the mean over each model's unmatched queries of their logits
    and of their cxcywh boxes (per student layer, over that layer's unmatched queries). Images
    where some model has no unmatched query get no extra pair. The extra pairs follow all the
    foreground pairs.

    Args and Returns: as :func:`similar_foreground_pairs`, N = objects + images with a pair.
    """
    return _pairs(student, teacher, targets, matcher, teacher_matcher, general=True)


def _unmatched(used, num_queries: int, device) -> torch.Tensor:
    return torch.tensor([q for q in range(num_queries) if q not in used], device=device).long()


def _pairs(student, teacher, targets, matcher, teacher_matcher, general: bool) -> Pairs:
    s_logits, s_boxes = _student(student)
    t_logits, t_boxes = _teacher(teacher)
    num_layers, device = s_logits.shape[0], s_logits.device
    layers = torch.arange(num_layers, device=device)[:, None]
    matches = _matches(
        s_logits, s_boxes, t_logits, t_boxes, targets, matcher, teacher_matcher or matcher
    )
    s_rows, t_rows, s_extra, t_extra = [], [], [], []  # student (L, n, .), teacher (n, .)
    labels, extra_labels = [], []  # ground-truth class per pair; -1 for the background pairs
    for b, (t_query, s_query, s_used, t_used, objects) in enumerate(matches):
        labels.append(targets[b]["labels"][torch.as_tensor(objects, dtype=torch.int64)].long())
        t_sel = torch.as_tensor(t_query, dtype=torch.int64, device=device)
        s_sel = torch.as_tensor(s_query, dtype=torch.int64, device=device).view(num_layers, -1)
        s_rows.append((s_logits[layers, b, s_sel], s_boxes[layers, b, s_sel]))
        t_rows.append((t_logits[b, t_sel], t_boxes[b, t_sel]))
        if not general:
            continue
        t_free = _unmatched(t_used, t_logits.shape[1], device)
        s_free = [_unmatched(used, s_logits.shape[2], device) for used in s_used]
        if len(t_free) == 0 or any(len(free) == 0 for free in s_free):
            continue
        t_extra.append(tuple(t[b, t_free].mean(0, keepdim=True) for t in (t_logits, t_boxes)))
        extra_labels.append(torch.full((1,), -1, dtype=torch.int64))
        s_extra.append(
            tuple(
                torch.stack([s[lv, b, free].mean(0) for lv, free in enumerate(s_free)])[:, None]
                for s in (s_logits, s_boxes)
            )
        )
    s_rows, t_rows = s_rows + s_extra, t_rows + t_extra
    return (
        {
            "pred_logits": torch.cat([r[0] for r in s_rows], dim=1)[:, None],
            "pred_boxes": torch.cat([r[1] for r in s_rows], dim=1)[:, None],
        },
        {
            "pred_logits": torch.cat([r[0] for r in t_rows])[None],
            "pred_boxes": torch.cat([r[1] for r in t_rows])[None],
            "gt_labels": torch.cat(labels + extra_labels).to(device)[None],
        },
    )
