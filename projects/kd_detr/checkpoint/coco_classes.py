# Copyright (c) kd_detr contributors.
"""The 91 COCO category-id slots of official DETR-family checkpoints vs Detectron2's 80 classes.

Official DETR, DAB-DETR and DN-DAB-DETR train with ``num_classes = 91`` (the largest COCO
category id + 1): logit/embedding row i belongs to category id i, and 11 ids are unused. DETR's
softmax head adds a "no object" row (92 rows), DN-DAB-DETR's label embedding a "no object" row at
index 91 (92 rows), DAB-DETR's sigmoid head has 91 rows. Detectron2 numbers the 80 categories
contiguously in id order (``thing_dataset_id_to_contiguous_id``).
"""
from typing import List

import torch

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

__all__ = ["COCO_ID_SLOTS", "coco_category_ids", "coco_rows_to_contiguous"]

COCO_ID_SLOTS = 91


def coco_category_ids() -> List[int]:
    """The 80 COCO thing category ids, in Detectron2's contiguous class order."""
    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def coco_rows_to_contiguous(rows: torch.Tensor, no_object_row: bool) -> torch.Tensor:
    """Select the rows of the 80 classes (then the "no object" row, index 91, if any) from a
    tensor whose first dimension has 91 category-id slots (+ 1 with ``no_object_row``)."""
    expected = COCO_ID_SLOTS + int(no_object_row)
    if rows.shape[0] != expected:
        raise ValueError(f"expected {expected} COCO rows, got {rows.shape[0]}")
    index = coco_category_ids() + ([COCO_ID_SLOTS] if no_object_row else [])
    return rows[torch.tensor(index)]
