# Copyright (c) kd_detr contributors.
"""ViLD-image data path: attach cached CLIP regions to every training sample."""
import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.structures import Boxes, Instances

from ..data import TRAIN_MAPPER_REGISTRY
from ..utils import expand_data_path
from .clip_regions import ClipRegionCache
from .vild_config import vild_uses_clip_regions

__all__ = ["ViLDDatasetMapper", "build_vild_train_mapper"]


class ViLDDatasetMapper(DatasetMapper):
    """DatasetMapper that, in training, adds ``distill_regions``: Instances with
    ``proposal_boxes`` (the cached regions, transformed like the image, clipped, empty ones
    dropped) and ``clip_embeds`` (M, D), for up to ``regions_per_image`` regions drawn at random
    without replacement from the image's cache entry."""

    @configurable
    def __init__(
        self, is_train: bool, *, region_cache=None, regions_per_image: int = 300, **kwargs
    ):
        """
        Args:
            region_cache: a :class:`ClipRegionCache` (None: no regions attached).
            regions_per_image: regions sampled per image and iteration.
            is_train, kwargs: as for ``DatasetMapper``.
        """
        super().__init__(is_train, **kwargs)
        self.region_cache = region_cache
        self.regions_per_image = int(regions_per_image)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        vild = cfg.MODEL.OV.VILD
        if is_train and vild_uses_clip_regions(cfg):
            if not vild.REGION_CACHE_DIR:
                raise ValueError(
                    "MODEL.OV.VILD.IMAGE_LOSS_WEIGHT > 0 and MODEL.OV.REGIONCLIP.*_WEIGHT > 0 need "
                    "MODEL.OV.VILD.REGION_CACHE_DIR: run tools/precompute_clip_regions.py and set "
                    "it to the folder it prints"
                )
            cache = ClipRegionCache(expand_data_path(vild.REGION_CACHE_DIR))
            if cache.embed_dim not in (None, cfg.MODEL.OV.EMBED_DIM):
                raise ValueError(
                    f"The CLIP region cache {cache.directory} holds {cache.embed_dim}-d embeddings "
                    f"but MODEL.OV.EMBED_DIM is {cfg.MODEL.OV.EMBED_DIM}: use a cache made with "
                    "the CLIP model of the text embeddings"
                )
            ret.update(region_cache=cache, regions_per_image=vild.REGIONS_PER_IMAGE)
        return ret

    def __call__(self, dataset_dict):
        if self.region_cache is None or not self.is_train:
            return super().__call__(dataset_dict)
        entry = self.region_cache.load(
            dataset_dict["image_id"], dataset_dict.get("file_name", "")
        )
        num = len(entry["boxes"])
        if num > self.regions_per_image:
            pick = np.sort(np.random.choice(num, self.regions_per_image, replace=False))
        else:
            pick = np.arange(num)
        dataset_dict = dict(dataset_dict, annotations=dataset_dict.get("annotations", []))
        dataset_dict["_vild_boxes"] = entry["boxes"][pick]
        dataset_dict["_vild_embeds"] = entry["embeddings"][pick]
        return super().__call__(dataset_dict)

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        if "_vild_boxes" not in dataset_dict:
            return
        boxes = dataset_dict.pop("_vild_boxes").reshape(-1, 4)
        boxes = transforms.apply_box(boxes)  # XYXY_ABS
        boxes = Boxes(torch.as_tensor(np.asarray(boxes), dtype=torch.float32).reshape(-1, 4))
        boxes.clip(image_shape)
        keep = boxes.nonempty()
        regions = Instances(image_shape)
        regions.proposal_boxes = boxes[keep]
        regions.clip_embeds = torch.as_tensor(dataset_dict.pop("_vild_embeds"))[keep]
        dataset_dict["distill_regions"] = regions


@TRAIN_MAPPER_REGISTRY.register(name="VILD_REGIONS")
def build_vild_train_mapper(cfg):
    """:class:`ViLDDatasetMapper` when the config distils cached CLIP regions (ViLD-image or
    RegionCLIP), else None."""
    if not vild_uses_clip_regions(cfg):
        return None
    return ViLDDatasetMapper(cfg, True)
