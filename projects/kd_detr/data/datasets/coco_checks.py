# Copyright (c) kd_detr contributors.
"""Checks of COCO-format annotations: the categories of a json without parsing all of it, boxes
with non-finite coordinates or outside their image, annotations of unknown categories."""
import json
import math
import os
from typing import Dict, List, Tuple

__all__ = [
    "box_problems",
    "categories_from_json",
    "read_coco_categories",
    "unknown_category_annotations",
]

_HEAD_TAIL_BYTES = 4 << 20  # where a big json's "categories" list is looked for first


def _decode_list_after(text: str, key_at: int):
    start = text.index("[", key_at)
    value, _ = json.JSONDecoder().raw_decode(text, start)
    return value


def categories_from_json(content: Dict) -> Tuple[List[str], Dict[int, int]]:
    """(class names by category id, category id -> contiguous id), as ``load_coco_json`` orders
    them (sorted by id)."""
    cats = sorted(content["categories"], key=lambda c: c["id"])
    return [c["name"] for c in cats], {c["id"]: i for i, c in enumerate(cats)}


def read_coco_categories(json_file: str) -> Tuple[List[str], Dict[int, int]]:
    """The categories of a COCO json (see :func:`categories_from_json`) without parsing a big
    file whole: the "categories" list is decoded from the file's last or first 4 MiB when found
    there (COCO writes it last), else the whole file is read.

    Raises:
        ValueError: the json has no usable "categories" list (naming the file).
    """
    size = os.path.getsize(json_file)
    cats = None
    if size > 2 * _HEAD_TAIL_BYTES:
        with open(json_file, "rb") as f:
            head = f.read(_HEAD_TAIL_BYTES).decode("utf-8", errors="ignore")
            f.seek(size - _HEAD_TAIL_BYTES)
            tail = f.read().decode("utf-8", errors="ignore")
        for text in (tail, head):
            at = text.rfind('"categories"')
            if at >= 0:
                try:
                    cats = _decode_list_after(text, at)
                    break
                except (ValueError, json.JSONDecodeError):
                    continue
    if cats is None:
        with open(json_file) as f:
            try:
                content = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{json_file} is not valid json: {e}") from e
        if not isinstance(content, dict) or "categories" not in content:
            found = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise ValueError(
                f"{json_file} is not a COCO-format json: it lacks the key(s) 'categories' "
                f"(found keys: {found})"
            )
        cats = content["categories"]
    named = isinstance(cats, list) and all("id" in c and "name" in c for c in cats)
    if not cats or not named:
        raise ValueError(
            f"{json_file}: 'categories' must be a non-empty list of {{'id', 'name'}} objects"
        )
    return categories_from_json({"categories": cats})


def unknown_category_annotations(json_file: str) -> List[Tuple[int, int]]:
    """(annotation id, category id) of every annotation whose category is not in "categories"."""
    with open(json_file) as f:
        content = json.load(f)
    known = {c["id"] for c in content.get("categories", [])}
    return [
        (a.get("id", -1), a.get("category_id"))
        for a in content.get("annotations", [])
        if a.get("category_id") not in known
    ]


def box_problems(record: Dict) -> Tuple[List[Dict], int, int, int]:
    """Split a dataset dict's annotations by box validity.

    Returns:
        tuple: (kept annotations, #dropped with a non-finite coordinate, #dropped with zero or
        negative width / height, #kept boxes extending beyond the image (training clips them;
        evaluation counts them as they are)).
    """
    kept, non_finite, degenerate, outside = [], 0, 0, 0
    height, width = record.get("height"), record.get("width")
    for a in record.get("annotations", []):
        box = a.get("bbox")
        if box is None:
            kept.append(a)
            continue
        if not all(math.isfinite(float(v)) for v in box):
            non_finite += 1
        elif min(box[2:4]) <= 0:
            degenerate += 1
        else:
            kept.append(a)
            x, y, w, h = box  # XYWH_ABS (load_coco_json keeps COCO's mode)
            if width and height and (x < 0 or y < 0 or x + w > width or y + h > height):
                outside += 1
    return kept, non_finite, degenerate, outside
