# Copyright (c) kd_detr contributors.
"""The training ``forward`` of DETR-family models with denoising queries (DN-DAB-DETR, DINO)."""
from typing import Dict, List, Optional

__all__ = ["DenoisingForwardMixin"]


class DenoisingForwardMixin:
    """Put before a :class:`DETR` subclass whose ``forward_raw`` takes ``denoising`` queries and
    which has ``self.denoising`` (a ``DenoisingGenerator``, or None when disabled)."""

    def forward(self, batched_inputs: List[Dict], extra_query_groups: Optional[List[Dict]] = None):
        """:meth:`DETR.forward`; in training with denoising the targets also become denoising
        queries (``self.denoising(targets)``) and the losses include ``loss_*_dn``."""
        if not (self.training and self.denoising is not None):
            return super().forward(batched_inputs, extra_query_groups)
        images = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        outputs = self.forward_raw(images, extra_query_groups, self.denoising(targets))
        loss_dict = self.losses(outputs, targets)
        return loss_dict if extra_query_groups is None else (loss_dict, outputs)
