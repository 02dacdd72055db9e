# Copyright (c) kd_detr contributors.
"""What a loader does with an image it cannot read (``DATALOADER.ON_BAD_IMAGE``): stop naming the
file, or skip it with a warning naming the file and the running count."""
import logging
from typing import Callable, Dict, Optional

__all__ = ["BAD_IMAGE_ERRORS", "BadImagePolicy"]

logger = logging.getLogger(__name__)

# Errors of reading / decoding an image file (PIL raises OSError for truncated or unknown data,
# SyntaxError for some broken headers, ValueError / Detectron2's SizeMismatchError for a
# width / height different from the dataset's).
BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)


class BadImagePolicy:
    """Wraps a dataset mapper.

    Args:
        mapper: the wrapped mapper (dataset dict -> dict).
        on_bad_image (str): "error": raise a RuntimeError naming the file and the fix; "skip":
            return None (Detectron2's loaders then draw another sample in training; test loaders
            would miss the image, so skipping there is an error too) with a warning naming the
            file and how many were skipped so far.
        is_train (bool): the mapper serves a training loader.
    """

    def __init__(self, mapper: Callable, on_bad_image: str = "error", is_train: bool = True):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(
                f"DATALOADER.ON_BAD_IMAGE must be 'error' or 'skip', got {on_bad_image!r}"
            )
        self.mapper = mapper
        self.on_bad_image = on_bad_image
        self.is_train = is_train
        self.skipped = 0

    @classmethod
    def from_config(cls, cfg, mapper: Callable) -> "BadImagePolicy":
        return cls(
            mapper, cfg.DATALOADER.ON_BAD_IMAGE, is_train=getattr(mapper, "is_train", True)
        )

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        try:
            return self.mapper(dataset_dict)
        except BAD_IMAGE_ERRORS as e:
            file_name = dataset_dict.get("file_name", "<no file_name>")
            if self.on_bad_image == "skip" and self.is_train:
                self.skipped += 1
                logger.warning(
                    f"Skipped unreadable image {file_name} ({type(e).__name__}: {e}); "
                    f"{self.skipped} image(s) skipped so far in this loader worker"
                )
                return None
            raise RuntimeError(
                f"Cannot read image {file_name}: {type(e).__name__}: {e}. Fix or remove the file "
                "(tools/check_dataset.py lists every bad image), or set DATALOADER.ON_BAD_IMAGE "
                "skip to skip unreadable training images with a warning."
            ) from e
