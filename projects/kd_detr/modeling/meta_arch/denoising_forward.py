# Copyright (c) kd_detr contributors.
"""The training ``forward`` and denoising losses of DETR-family models with denoising queries
(DN-DAB-DETR, DINO)."""
from typing import Dict, List, Optional

import torch

from ..denoising import denoising_losses

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

    def denoising_loss_terms(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """Unweighted ``loss_*_dn`` (last layer) and ``loss_*_dn_{i}`` (layer i) terms of
        ``outputs["denoising"]``; {} unless training with denoising. A batch without objects
        (no denoising queries) gets zeros that keep the label embedding in the autograd graph,
        so the keys and the used parameters never change."""
        if not (self.training and self.denoising is not None):
            return {}
        criterion = self.criterion
        dn = outputs.get("denoising")
        if dn is None:
            zero = outputs["pred_logits"].sum() * 0 + self.denoising.label_enc.weight.sum() * 0
            return {k: zero for k in criterion.weight_dict if "_dn" in k}
        return denoising_losses(
            dn["pred_logits"],
            dn["pred_boxes"],
            dn["queries"],
            criterion.get_num_boxes(targets, dn["pred_logits"].device),
            criterion.focal_alpha,
            criterion.focal_gamma,
            all_layers=self.aux_loss,
        )
