# Copyright (c) kd_detr contributors.
"""CLIP image embeddings of image regions (ViLD-image targets) and their on-disk cache.

A region's embedding is computed from two crops of the image, the box itself and the box
enlarged 1.5x about its centre (both clipped to the image and rounded outwards to whole
pixels), each resized to the CLIP input size (bicubic, no aspect-ratio preservation) and
normalised with CLIP's mean / std. The two L2-normalised CLIP embeddings are averaged and the
mean is L2-normalised.

The cache is a folder named by a hash of (proposal source, CLIP model, settings) holding
``meta.json`` and one ``<image_id>.npz`` per image (``boxes`` (M, 4) float32 XYXY in original
image pixels, ``scores`` (M,) float32, ``embeddings`` (M, D) float16).
"""
import hashlib
import json
import math
import os
import re
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from detectron2.data.detection_utils import read_image

from .region_proposals import top_proposals

__all__ = [
    "CROP_SCALES",
    "ClipRegionCache",
    "crop_box",
    "embed_dim",
    "encode_regions",
    "file_identity",
    "precompute_clip_regions",
    "region_crops",
]

CROP_SCALES = (1.0, 1.5)
TOOL = "tools/precompute_clip_regions.py"


def file_identity(path: str) -> dict:
    """Absolute path, size and mtime of a file: changes when the file is replaced."""
    path = os.path.abspath(os.path.expanduser(path))
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def crop_box(box: Sequence[float], scale: float, width: int, height: int) -> tuple:
    """Integer crop (x0, y0, x1, y1) of ``box`` (XYXY) scaled about its centre by ``scale``,
    rounded outwards and clipped to the image; at least one pixel wide and high."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    left = min(max(math.floor(cx - half_w), 0), width - 1)
    top = min(max(math.floor(cy - half_h), 0), height - 1)
    right = max(min(math.ceil(cx + half_w), width), left + 1)
    bottom = max(min(math.ceil(cy + half_h), height), top + 1)
    return left, top, right, bottom


def region_crops(
    image: Image.Image, boxes: np.ndarray, scale: float, size: Sequence[int], mean, std
) -> torch.Tensor:
    """(M, 3, H, W) normalised crops of an RGB image for (M, 4) XYXY boxes at one scale."""
    out_w, out_h = (size, size) if isinstance(size, int) else (size[1], size[0])
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    crops = []
    for box in boxes:
        crop = image.crop(crop_box(box, scale, image.width, image.height))
        crop = crop.resize((out_w, out_h), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
        crops.append((pixels - mean) / std)
    if not crops:
        return torch.zeros(0, 3, out_h, out_w)
    return torch.stack(crops)


@torch.no_grad()
def encode_regions(
    model,
    image: Image.Image,
    boxes: np.ndarray,
    *,
    size,
    mean,
    std,
    scales: Sequence[float] = CROP_SCALES,
    batch_size: int = 64,
    device="cpu",
) -> torch.Tensor:
    """CLIP embeddings of image regions.

    Args:
        model: an open_clip model (``encode_image``).
        image: the RGB image.
        boxes: (M, 4) XYXY boxes in image pixels.
        size, mean, std: the model's input size and normalisation
            (``open_clip.get_model_preprocess_cfg``).
        scales: crop scales whose embeddings are averaged (ViLD: 1x and 1.5x).

    Returns:
        (M, D) float32 unit rows: the normalised mean of the normalised per-scale embeddings.
    """
    if len(boxes) == 0:
        return torch.zeros(0, embed_dim(model))
    total = 0.0
    for scale in scales:
        crops = region_crops(image, boxes, scale, size, mean, std)
        feats = [
            model.encode_image(crops[i : i + batch_size].to(device)).float()
            for i in range(0, len(crops), batch_size)
        ]
        total = total + F.normalize(torch.cat(feats), dim=1)
    return F.normalize(total, dim=1).cpu()


def embed_dim(model) -> int:
    """Output size D of an open_clip model's image tower."""
    return int(model.visual.output_dim)


def _safe_name(image_id) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(image_id))
    if name in ("", ".", ".."):
        name = "id_" + hashlib.sha1(str(image_id).encode()).hexdigest()
    return name


class ClipRegionCache:
    """Resumable per-image store of region boxes and CLIP embeddings (see module docstring)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        meta = os.path.join(self.directory, "meta.json")
        if not os.path.isfile(meta):
            raise FileNotFoundError(
                f"{self.directory} is not a CLIP region cache (no meta.json): run {TOOL} and set "
                "MODEL.OV.VILD.REGION_CACHE_DIR to the folder it prints"
            )
        with open(meta) as f:
            self.meta = json.load(f)

    @staticmethod
    def key_hash(key: dict) -> str:
        """16 hex digits identifying a (proposal source, model, settings) key."""
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def create(cls, root: str, key: dict, command: str = "") -> "ClipRegionCache":
        """Open ``root/<hash of key>``, creating it (and its meta.json) when absent."""
        directory = os.path.join(os.path.abspath(os.path.expanduser(root)), cls.key_hash(key))
        meta = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta):
            os.makedirs(directory, exist_ok=True)
            tmp = f"{meta}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"key": key, "command": command}, f, indent=1)
            os.replace(tmp, meta)
        return cls(directory)

    def path(self, image_id) -> str:
        return os.path.join(self.directory, f"{_safe_name(image_id)}.npz")

    def has(self, image_id) -> bool:
        return os.path.isfile(self.path(image_id))

    def save(self, image_id, boxes, scores, embeddings) -> None:
        """Write one image's entry atomically (an interrupted run leaves no partial file)."""
        path = self.path(image_id)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                scores=np.asarray(scores, dtype=np.float32).reshape(-1),
                embeddings=np.asarray(embeddings, dtype=np.float16),
            )
        os.replace(tmp, path)

    def load(self, image_id, file_name: str = "") -> Dict[str, np.ndarray]:
        """{"boxes": (M, 4), "scores": (M,), "embeddings": (M, D) float32} of one image.

        Raises:
            FileNotFoundError: naming the image and the command that fills the cache.
        """
        path = self.path(image_id)
        if not os.path.isfile(path):
            command = self.meta.get("command") or f"python {TOOL} ..."
            raise FileNotFoundError(
                f"No CLIP region embeddings for image {image_id} ({file_name or 'unknown file'}) "
                f"in {self.directory}: compute them with `{command}` (it skips images already "
                "done), or set MODEL.OV.VILD.IMAGE_LOSS_WEIGHT 0"
            )
        with np.load(path) as data:
            return {
                "boxes": data["boxes"],
                "scores": data["scores"],
                "embeddings": data["embeddings"].astype(np.float32),
            }

    @property
    def embed_dim(self) -> Optional[int]:
        """CLIP embedding size recorded in meta.json (None when unknown)."""
        return self.meta.get("key", {}).get("model", {}).get("embed_dim")


def precompute_clip_regions(
    dataset_dicts: Sequence[dict],
    proposals_fn: Callable[[dict, np.ndarray], tuple],
    model,
    cache: ClipRegionCache,
    *,
    num_proposals: int = 300,
    scales: Sequence[float] = CROP_SCALES,
    batch_size: int = 64,
    device="cpu",
    show_progress: bool = True,
) -> int:
    """Fill ``cache`` with the CLIP embeddings of each image's top proposals; images already
    in the cache are skipped (resume).

    Args:
        dataset_dicts: Detectron2 dataset dicts ("image_id", "file_name").
        proposals_fn: (dataset dict, (H, W, 3) RGB uint8 image) -> ((K, 4) XYXY boxes in image
            pixels, (K,) scores).
        model: an open_clip model in eval mode.
        num_proposals: M, the top-scoring proposals kept per image (sides >= 1 pixel).

    Returns:
        The number of images computed (not skipped).
    """
    preprocess = _preprocess_cfg(model)
    todo = [d for d in dataset_dicts if not cache.has(d["image_id"])]
    for record in tqdm(todo, desc="CLIP regions", unit="image", disable=not show_progress):
        image = read_image(record["file_name"], format="RGB")
        boxes, scores = proposals_fn(record, image)
        boxes, scores = top_proposals(boxes, scores, num_proposals)
        embeddings = encode_regions(
            model, Image.fromarray(image), boxes, scales=scales, batch_size=batch_size,
            device=device, **preprocess,
        )  # fmt: skip
        cache.save(record["image_id"], boxes, scores, embeddings.numpy())
    return len(todo)


def _preprocess_cfg(model) -> dict:
    import open_clip  # optional third-party package: imported only when regions are encoded

    cfg = open_clip.get_model_preprocess_cfg(model)
    return {"size": cfg["size"], "mean": cfg["mean"], "std": cfg["std"]}
