# Copyright (c) kd_detr contributors.
"""The built-in synthetic demo dataset, registered as "kd_demo_train" and "kd_demo_val".

Each image shows a few filled shapes (circle, square, triangle, cross) on a noisy, textured
background. Each class has a colour tendency (red, green, blue, yellow) that holds for most but not
all objects, so that a model must also learn shapes. The images are generated deterministically on
first use into a cache folder keyed by the generator settings, written atomically, and described by
one COCO-format json per split.
"""
import colorsys
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ...utils import cache_root
from .registry import DATASET_SOURCE_REGISTRY

__all__ = [
    "DEMO_CLASSES",
    "DemoSettings",
    "demo_root",
    "demo_dataset_dir",
    "generate_demo_dataset",
    "prepare_demo_dataset",
    "register_demo_datasets",
]

logger = logging.getLogger(__name__)

DEMO_CLASSES = ("circle", "square", "triangle", "cross")
# Hue (HSV, in [0, 1)) each class tends to have: red, green, blue, yellow.
_CLASS_HUES = (0.0, 0.33, 0.61, 0.14)
# Share of objects whose hue is drawn at random instead of from their class's tendency.
_RANDOM_HUE_PROB = 0.15
# Largest share of the smaller of two boxes that may overlap the other (so IoU <= 0.3 as well).
_MAX_OVERLAP = 0.3
_PLACEMENT_TRIES = 30
_SPLITS = ("train", "val")
# Bump when the images change for the same settings, so that old caches are not reused.
_GENERATOR_VERSION = 1


def _cross_polygon(arm=1 / 6):
    """A plus sign in [-0.5, 0.5]^2 whose arms are ``2 * arm`` wide."""
    half = [(arm, 0.5), (arm, arm), (0.5, arm), (0.5, -arm), (arm, -arm), (arm, -0.5)]
    return half + [(-x, -y) for x, y in half]


# Unit shapes as polygons in [-0.5, 0.5]^2 (the circle is drawn as an ellipse).
_UNIT_POLYGONS = {
    "square": [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "triangle": [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "cross": _cross_polygon(),
}
_SUPERSAMPLE = 2  # shapes are drawn at twice the resolution, then reduced (anti-aliasing)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Generator settings; the defaults match ``cfg.DATASETS.KD_DEMO``."""

    num_train: int = 600
    num_val: int = 100
    image_size: int = 192
    min_objects: int = 1
    max_objects: int = 4
    object_size: Tuple[float, float] = (0.15, 0.45)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "object_size", tuple(float(x) for x in self.object_size))
        lo, hi = self.object_size
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"Need at least one train and one val image: {self}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels: {self}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"Need 1 <= min_objects <= max_objects: {self}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative: {self}")
        if not 0.05 <= lo <= hi <= 0.7:
            raise ValueError(f"object_size must be (lo, hi) with 0.05 <= lo <= hi <= 0.7: {self}")

    @classmethod
    def from_cfg(cls, cfg):
        """Settings from ``cfg.DATASETS.KD_DEMO``."""
        c = cfg.DATASETS.KD_DEMO
        return cls(
            num_train=c.NUM_TRAIN,
            num_val=c.NUM_VAL,
            image_size=c.IMAGE_SIZE,
            min_objects=c.MIN_OBJECTS,
            max_objects=c.MAX_OBJECTS,
            object_size=tuple(c.OBJECT_SIZE),
            seed=c.SEED,
        )

    def key(self):
        """Short hash of the settings (and generator version): the name of their cache folder."""
        payload = json.dumps([_GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:10]

    def num_images(self, split):
        return self.num_train if split == "train" else self.num_val


def demo_root(cfg=None):
    """Cache root: ``cfg.DATASETS.KD_DEMO.ROOT``, else ``$KD_DETR_DATA``, else ~/.cache/kd_detr."""
    root = cfg.DATASETS.KD_DEMO.ROOT if cfg is not None else ""
    return os.path.abspath(os.path.expanduser(root)) if root else cache_root()


def demo_dataset_dir(settings, root):
    """The folder holding the dataset generated with ``settings`` under cache ``root``."""
    return os.path.join(root, f"kd_demo_{settings.image_size}px_{settings.key()}")


def _json_file(directory, split):
    return os.path.join(directory, "annotations", f"instances_{split}.json")


def _background(rng, size):
    """A muted, textured background: smooth blotches plus mild colour variation (float HxWx3)."""
    base = rng.uniform(70.0, 185.0) + rng.normal(0.0, 10.0, size=3)

    def smooth_noise(cells, channels, amplitude):
        coarse = rng.normal(128.0, 42.0, size=(cells, cells, channels)).clip(0, 255)
        coarse = coarse.astype(np.uint8)
        image = Image.fromarray(coarse[..., 0] if channels == 1 else coarse)
        fine = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32)
        return (fine.reshape(size, size, channels) - 128.0) * (amplitude / 42.0)

    texture = smooth_noise(6, 1, 28.0) + smooth_noise(24, 1, 12.0) + smooth_noise(12, 3, 8.0)
    return base.astype(np.float32) + texture


def _object_color(rng, class_id):
    hue = rng.random() if rng.random() < _RANDOM_HUE_PROB else _CLASS_HUES[class_id]
    hue = (hue + rng.normal(0.0, 0.025)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    return tuple(int(round(255 * c)) for c in rgb)


def _shape_mask(rng, class_id, size, object_size):
    """An anti-aliased "L" mask of one shape, cropped to its extent, and its area in pixels."""
    side = rng.uniform(*object_size) * size
    aspect = np.exp(rng.uniform(-0.2, 0.2))
    width, height = side * np.sqrt(aspect), side / np.sqrt(aspect)
    name = DEMO_CLASSES[class_id]
    if name == "circle":
        points = None
        extent = np.array([width, height])
    else:
        angle = np.deg2rad(rng.uniform(-20.0, 20.0))
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = (np.array(_UNIT_POLYGONS[name]) * [width, height]) @ rotation.T
        extent = points.max(axis=0) - points.min(axis=0)
        points = points - points.min(axis=0)
    extent = np.minimum(np.ceil(extent).astype(int) + 1, size)
    s = _SUPERSAMPLE
    canvas = Image.new("L", (int(extent[0]) * s, int(extent[1]) * s), 0)
    draw = ImageDraw.Draw(canvas)
    if points is None:
        draw.ellipse([0, 0, width * s - 1, height * s - 1], fill=255)
    else:
        draw.polygon([(float(x) * s, float(y) * s) for x, y in points], fill=255)
    mask = canvas.resize((int(extent[0]), int(extent[1])), Image.BOX)
    inside = np.asarray(mask) >= 128
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return mask.crop(box), int(inside.sum())


def _overlap(a, b):
    """Intersection of two XYWH boxes over the area of the smaller one (an upper bound of IoU)."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(iw, 0) * max(ih, 0) / float(min(a[2] * a[3], b[2] * b[3]))


def _render(rng, settings):
    """One image (uint8 HxWx3) and its objects as (class_id, XYWH box, area) tuples."""
    size = settings.image_size
    image = Image.fromarray(_background(rng, size).clip(0, 255).astype(np.uint8))
    objects = []
    for _ in range(rng.integers(settings.min_objects, settings.max_objects + 1)):
        class_id = int(rng.integers(len(DEMO_CLASSES)))
        mask, area = _shape_mask(rng, class_id, size, settings.object_size)
        color = _object_color(rng, class_id)
        for _ in range(_PLACEMENT_TRIES):
            x = int(rng.integers(0, size - mask.width + 1))
            y = int(rng.integers(0, size - mask.height + 1))
            box = (x, y, mask.width, mask.height)
            if all(_overlap(box, other[1]) <= _MAX_OVERLAP for other in objects):
                image.paste(Image.new("RGB", mask.size, color), (x, y), mask)
                objects.append((class_id, box, area))
                break
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, size=(size, size, 3))
    return pixels.clip(0, 255).astype(np.uint8), objects


def _write_split(directory, split, settings, progress):
    split_id = _SPLITS.index(split)
    os.makedirs(os.path.join(directory, split))
    images, annotations = [], []
    for index in range(settings.num_images(split)):
        # One generator per image: image i does not depend on how many images come before it.
        rng = np.random.default_rng([settings.seed, split_id, index])
        pixels, objects = _render(rng, settings)
        file_name = f"{index:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(directory, split, file_name), quality=95)
        image_id = index + 1
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for class_id, box, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_id + 1,
                    "bbox": list(box),
                    "area": area,
                    "iscrowd": 0,
                }
            )
        progress.update(1)
    content = {
        "info": {"description": f"kd_detr synthetic demo dataset, {split} split"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(DEMO_CLASSES)
        ],
    }
    with open(_json_file(directory, split), "w") as f:
        json.dump(content, f)


def generate_demo_dataset(directory, settings, *, show_progress=True):
    """Generate the dataset into ``directory`` (created; it must not exist). Not atomic: see
    :func:`prepare_demo_dataset`.
    """
    os.makedirs(directory)
    os.makedirs(os.path.join(directory, "annotations"))
    total = settings.num_train + settings.num_val
    with tqdm(total=total, desc="kd_demo images", unit="img", disable=not show_progress) as bar:
        for split in _SPLITS:
            _write_split(directory, split, settings, bar)
    with open(os.path.join(directory, "settings.json"), "w") as f:
        json.dump({"generator_version": _GENERATOR_VERSION, **dataclasses.asdict(settings)}, f)


def prepare_demo_dataset(settings=None, root=None, *, show_progress=True):
    """Return the dataset folder for ``settings``, generating it first when it is not cached.

    Generation writes into a temporary folder next to the final one and renames it at the end,
    so an interrupted run never leaves a partial dataset, and when two processes generate at the
    same time the first rename wins and the other process uses its result.

    Args:
        settings (DemoSettings or None): generator settings (default: ``DemoSettings()``).
        root (str or None): cache root (default: :func:`demo_root`).
        show_progress (bool): show a tqdm progress bar while generating.
    """
    settings = settings or DemoSettings()
    root = os.path.abspath(os.path.expanduser(root)) if root else demo_root()
    directory = demo_dataset_dir(settings, root)
    complete = all(os.path.isfile(_json_file(directory, split)) for split in _SPLITS)
    if complete:
        return directory
    if os.path.exists(directory):
        raise RuntimeError(f"Incomplete kd_demo dataset at {directory}: delete it to regenerate")
    os.makedirs(root, exist_ok=True)
    logger.info(f"Generating the kd_demo dataset ({settings}) into {directory}")
    staging = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=root)
    try:
        generate_demo_dataset(os.path.join(staging, "data"), settings, show_progress=show_progress)
        os.chmod(os.path.join(staging, "data"), 0o755)
        try:
            os.rename(os.path.join(staging, "data"), directory)
        except OSError:
            if not os.path.isdir(directory):
                raise
            logger.info(f"Another process generated {directory} first; using it.")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _load_split(name, split, settings, root):
    directory = prepare_demo_dataset(settings, root)
    return load_coco_json(_json_file(directory, split), os.path.join(directory, split), name)


def register_demo_datasets(cfg=None):
    """(Re-)register "kd_demo_train" and "kd_demo_val" for ``cfg.DATASETS.KD_DEMO`` (or defaults).

    Nothing is generated here: that happens when a dataset is first loaded (or by calling
    :func:`prepare_demo_dataset`). The metadata's ``json_file`` and ``image_root`` point into
    the cache folder.

    Returns:
        str: the dataset folder the two splits use.
    """
    settings = DemoSettings.from_cfg(cfg) if cfg is not None else DemoSettings()
    root = demo_root(cfg)
    directory = demo_dataset_dir(settings, root)
    for split in _SPLITS:
        name = f"kd_demo_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(_load_split, name, split, settings, root))
        MetadataCatalog.get(name).set(
            json_file=_json_file(directory, split),
            image_root=os.path.join(directory, split),
            thing_classes=list(DEMO_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(DEMO_CLASSES))},
            thing_colors=[
                tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, 0.9, 0.9))
                for h in _CLASS_HUES
            ],
            evaluator_type="coco",
            demo_settings=dataclasses.asdict(settings),
        )
    return directory


@DATASET_SOURCE_REGISTRY.register(name="KD_DEMO")
def register_demo_datasets_from_config(cfg):
    """Re-register the demo datasets for ``cfg.DATASETS.KD_DEMO``; built-in names, so none is
    returned."""
    register_demo_datasets(cfg)
    return []


register_demo_datasets()
