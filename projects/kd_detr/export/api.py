# Copyright (c) kd_detr contributors.
"""One-call export: config + weights -> eval model -> exported file + ``export.json``."""
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from ..config import load_config
from .adapters import build_export_adapter
from .errors import ExportError
from .exporters import DEFAULT_OPSET, EXPORTERS
from .metadata import write_export_metadata

__all__ = [
    "EXPORT_OPTS",
    "class_names",
    "default_image_size",
    "export_model",
    "load_export_config",
    "load_model",
]

# Config overrides every export applies: CPU, and deformable attention's pure-PyTorch kernel
# (F.grid_sample -> ONNX GridSample; the CUDA extension has no ONNX / TorchScript form).
EXPORT_OPTS = ("MODEL.DEVICE", "cpu", "MODEL.DETR.DEFORMABLE.ATTN_KERNEL", "pytorch")


def load_export_config(config_file: str, weights: str = "", opts: Sequence[str] = ()):
    """``load_config`` of the file + ``opts`` + :data:`EXPORT_OPTS` (+ MODEL.WEIGHTS)."""
    opts = list(opts) + list(EXPORT_OPTS)
    if weights:
        opts += ["MODEL.WEIGHTS", weights]
    return load_config(config_file, opts)


def load_model(cfg) -> nn.Module:
    """The eval-mode model of ``cfg`` with ``MODEL.WEIGHTS`` loaded (random init when empty)."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def default_image_size(cfg) -> Tuple[int, int]:
    """(H, W) of the export when none is given: a square of ``INPUT.MIN_SIZE_TEST``."""
    side = int(cfg.INPUT.MIN_SIZE_TEST)
    return side, side


def class_names(cfg, num_classes: Optional[int] = None) -> List[str]:
    """``thing_classes`` of ``DATASETS.TEST[0]`` (or TRAIN[0]); "0", "1", ... when unknown."""
    for names in (cfg.DATASETS.TEST, cfg.DATASETS.TRAIN):
        if names:
            classes = MetadataCatalog.get(names[0]).get("thing_classes", None)
            if classes:
                return list(classes)
    num_classes = cfg.MODEL.DETR.NUM_CLASSES if num_classes is None else num_classes
    return [str(i) for i in range(num_classes)]


def export_model(
    cfg,
    model: nn.Module,
    export_format: str,
    output_dir: str,
    image_size: Optional[Sequence[int]] = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    names: Optional[List[str]] = None,
) -> str:
    """Export ``model`` (eval mode) of ``cfg`` to ``output_dir`` with an ``export.json``.

    Args:
        export_format: "onnx" or "torchscript".
        image_size: (H, W) of the graph's input images (default :func:`default_image_size`).
        opset: ONNX opset (>= 16 for deformable attention).
        dynamic_batch: ONNX only: a symbolic batch axis N (else N = 1).
        names: class names for the sidecar (default :func:`class_names`).

    Returns:
        path of the exported model file.

    Raises:
        ExportError: unknown format, meta-architecture without export support, missing package,
            opset too low.
    """
    if export_format not in EXPORTERS:
        raise ExportError(
            f"unknown export format {export_format!r}. Fix: --format one of "
            f"{', '.join(sorted(EXPORTERS))}"
        )
    image_size = tuple(image_size or default_image_size(cfg))
    adapter = build_export_adapter(cfg, model)
    file_name, exporter = EXPORTERS[export_format]
    path = os.path.join(output_dir, file_name)
    # A dynamic batch is traced with two images, so that no batch-size-1 broadcast is
    # specialised into the graph; a static ONNX graph takes one image.
    batch = 2 if dynamic_batch or export_format == "torchscript" else 1
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((batch, 3) + image_size, generator=generator) * 255
    sizes = torch.tensor([[image_size[1], image_size[0]]] * batch, dtype=torch.int64)
    exporter(adapter, images, sizes, path, opset=opset, dynamic_batch=dynamic_batch)
    write_export_metadata(
        output_dir,
        model_file=path,
        export_format=export_format,
        meta_architecture=cfg.MODEL.META_ARCHITECTURE,
        image_size=image_size,
        input_format=cfg.INPUT.FORMAT,
        class_names=names if names is not None else class_names(cfg),
        opset=opset,
        dynamic_batch=dynamic_batch or export_format == "torchscript",
        weights=cfg.MODEL.WEIGHTS,
    )
    return path
