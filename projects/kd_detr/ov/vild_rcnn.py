# Copyright (c) kd_detr contributors.
"""``ViLDRCNN``: GeneralizedRCNN that hands the CLIP region targets to the ViLD ROI heads."""
from typing import Dict, List

import torch

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

__all__ = ["ViLDRCNN"]


@META_ARCH_REGISTRY.register()
class ViLDRCNN(GeneralizedRCNN):
    """Faster R-CNN for ViLD. In training with a ViLD-image or RegionCLIP loss, every input needs
    ``distill_regions`` (Instances with ``proposal_boxes`` and ``clip_embeds``, in the input
    image's coordinates), attached by :class:`kd_detr.ov.vild_data.ViLDDatasetMapper`; they are
    passed to :class:`ViLDROIHeads`. Otherwise it is GeneralizedRCNN."""

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        heads = self.roi_heads
        if not self.training or not getattr(heads, "uses_distill_regions", False):
            return super().forward(batched_inputs)
        missing = [i for i, x in enumerate(batched_inputs) if "distill_regions" not in x]
        if missing:
            names = [batched_inputs[i].get("file_name", f"#{i}") for i in missing[:3]]
            raise ValueError(
                f"Inputs {names} lack 'distill_regions' (the ViLD-image / RegionCLIP targets): "
                "train with kd_detr's Trainer (train_net.py) and MODEL.OV.VILD.REGION_CACHE_DIR "
                "set, whose ViLDDatasetMapper attaches them, or set the weights "
                "MODEL.OV.VILD.IMAGE_LOSS_WEIGHT and MODEL.OV.REGIONCLIP.*_WEIGHT to 0"
            )
        regions = [x["distill_regions"].to(self.device) for x in batched_inputs]
        with heads.distill_regions(regions):
            return super().forward(batched_inputs)
