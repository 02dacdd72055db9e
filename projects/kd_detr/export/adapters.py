# Copyright (c) kd_detr contributors.
"""Export adapters: a Detectron2 meta-architecture -> a module with a flat tensor interface.

An adapter wraps a built (eval-mode) model as ``forward(images, orig_target_sizes) -> (labels,
boxes, scores)``, the RT-DETR deployment contract:

* ``images``: (N, 3, H, W) float pixels in ``INPUT.FORMAT`` and the model's value range, already
  resized to the export size (H, W) as the model's test-time resize would (not normalised:
  normalisation, padding to ``size_divisibility`` and the padding mask are inside the graph).
* ``orig_target_sizes``: (N, 2) (width, height) of the original images.
* ``labels`` (N, k) int64, ``boxes`` (N, k, 4) xyxy in original pixels, ``scores`` (N, k).

Adapters are registered per meta-architecture name in :data:`EXPORT_ADAPTERS`; a new
meta-architecture (e.g. RT-DETR) plugs in with ``@EXPORT_ADAPTERS.register()`` on a class named
like its ``MODEL.META_ARCHITECTURE``, or ``register_export_adapter(name, cls)``.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils.registry import Registry

from .errors import ExportError
from .postprocess import topk_detections

__all__ = [
    "EXPORT_ADAPTERS",
    "DETRFamilyExportAdapter",
    "build_export_adapter",
    "register_export_adapter",
]

EXPORT_ADAPTERS = Registry("EXPORT_ADAPTERS")
EXPORT_ADAPTERS.__doc__ = "Meta-architecture name -> export adapter class (model) -> nn.Module."


class DETRFamilyExportAdapter(nn.Module):
    """DETR, DAB-DETR, Deformable DETR (incl. two-stage / box refine), DINO, RT-DETR (v1 /
    v2), D-FINE and the open-vocabulary heads: ``forward_raw`` on (normalised padded images,
    padding mask), then :func:`topk_detections` as ``DETR.inference`` +
    ``detector_postprocess``.

    The vocabulary of an open-vocabulary class head is whatever the model holds in eval mode when
    the adapter is traced (its text embeddings become graph constants).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.training:
            raise ValueError("export adapters wrap eval-mode models: call model.eval() first")
        self.model = model
        self.size_divisibility = int(model.size_divisibility)
        self.use_focal = bool(model.use_focal)
        self.topk = int(model.test_topk)
        self.eval()  # exporters restore the adapter's mode afterwards: keep it (and model) eval

    def normalise(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) pixels -> normalised images padded with zeros to ``size_divisibility``
        (N, 3, H', W') and their padding mask (N, H', W'), True on padding, as
        ``preprocess_image`` + ``padding_mask`` give for a batch of same-size images."""
        x = (images - self.model.pixel_mean) / self.model.pixel_std
        height, width = images.shape[-2:]
        div = self.size_divisibility
        pad_h = (div - height % div) % div if div > 1 else 0
        pad_w = (div - width % div) % div if div > 1 else 0
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        rows = torch.arange(height + pad_h, device=x.device) >= height
        cols = torch.arange(width + pad_w, device=x.device) >= width
        mask = (rows[:, None] | cols[None, :])[None].expand(x.shape[0], -1, -1)
        return x, mask

    def raw_outputs(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) pixels -> last-layer logits (N, Q, K) and sigmoid cxcywh boxes (N, Q, 4)."""
        outputs = self.model.forward_raw(self.normalise(images))
        return outputs["pred_logits"], outputs["pred_boxes"]

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor):
        """
        Args:
            images: (N, 3, H, W) float pixels (see the module docstring).
            orig_target_sizes: (N, 2) (width, height) of the original images.

        Returns:
            labels (N, k) int64, boxes (N, k, 4) float xyxy original pixels, scores (N, k).
        """
        logits, boxes = self.raw_outputs(images)
        return topk_detections(logits, boxes, orig_target_sizes, self.use_focal, self.topk)


def register_export_adapter(meta_architecture: str, adapter_cls) -> None:
    """Register ``adapter_cls`` (model -> nn.Module) for ``MODEL.META_ARCHITECTURE`` name."""
    EXPORT_ADAPTERS._do_register(meta_architecture, adapter_cls)


for _name in ("DETR", "DABDETR", "DeformableDETR", "DINO", "RTDETR", "DFINE"):
    register_export_adapter(_name, DETRFamilyExportAdapter)


def build_export_adapter(cfg, model: nn.Module) -> nn.Module:
    """The registered adapter of ``cfg.MODEL.META_ARCHITECTURE`` around ``model`` (eval mode).

    Raises:
        ExportError: when the meta-architecture has no export adapter (one line naming the fix).
    """
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in EXPORT_ADAPTERS:
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {name!r} has no export support; exportable: "
            f"{', '.join(sorted(k for k, _ in EXPORT_ADAPTERS))}. Fix: register an adapter with "
            "kd_detr.export.register_export_adapter(name, cls)"
        )
    return EXPORT_ADAPTERS.get(name)(model)
