# Copyright (c) kd_detr contributors.
"""Checks of a dataset's image files: every file exists and, for a sample (or all), its header
size equals the dataset's width / height (fast); ``full_decode`` decodes every image (what
``tools/check_dataset.py`` does, with a progress bar)."""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from PIL import Image
from tqdm import tqdm

__all__ = ["ImageProblems", "check_image_files"]


@dataclass
class ImageProblems:
    """What :func:`check_image_files` found: per problem a list of "file (details)" strings."""

    missing: List[str] = field(default_factory=list)
    size_mismatch: List[str] = field(default_factory=list)
    unreadable: List[str] = field(default_factory=list)
    checked_headers: int = 0
    total: int = 0

    def __bool__(self) -> bool:
        return bool(self.missing or self.size_mismatch or self.unreadable)

    def lines(self, limit: int = 5) -> List[str]:
        out = []
        for what, items in (
            ("missing", self.missing),
            ("with another width / height than the dataset says", self.size_mismatch),
            ("unreadable", self.unreadable),
        ):
            if items:
                shown = "; ".join(items[:limit]) + ("; ..." if len(items) > limit else "")
                out.append(f"{len(items)} image(s) {what}: {shown}")
        return out


def _sample(records: Sequence[Dict], max_headers: int) -> Sequence[Dict]:
    if max_headers < 0 or len(records) <= max_headers:
        return records
    step = len(records) / max_headers
    return [records[int(i * step)] for i in range(max_headers)]


def check_image_files(
    records: Sequence[Dict],
    *,
    max_headers: int = 2000,
    full_decode: bool = False,
    show_progress: bool = False,
) -> ImageProblems:
    """Check the image files of Detectron2 dataset dicts ("file_name", optional "height" /
    "width").

    Args:
        max_headers: how many images (evenly spread) get their header size checked; -1: all.
        full_decode: decode every existing image completely (slow; finds truncated files).
        show_progress: a tqdm progress bar over the images checked.
    """
    problems = ImageProblems(total=len(records))
    existing = []
    for record in records:
        if os.path.isfile(record["file_name"]):
            existing.append(record)
        else:
            problems.missing.append(record["file_name"])
    todo = existing if full_decode else _sample(existing, max_headers)
    for record in tqdm(todo, desc="Checking images", unit="image", disable=not show_progress):
        name = record["file_name"]
        try:
            with Image.open(name) as image:
                width, height = image.size
                if full_decode:
                    image.load()
        except (OSError, SyntaxError, ValueError) as e:
            problems.unreadable.append(f"{name} ({type(e).__name__}: {e})")
            continue
        problems.checked_headers += 1
        expected = (record.get("width"), record.get("height"))
        if None not in expected and expected != (width, height):
            problems.size_mismatch.append(
                f"{name} (file {width}x{height}, dataset {expected[0]}x{expected[1]})"
            )
    return problems
