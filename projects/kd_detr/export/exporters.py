# Copyright (c) kd_detr contributors.
"""Write an export adapter (see :mod:`.adapters`) to ONNX or TorchScript.

Both formats are produced by tracing the adapter on a sample batch of the export size (H, W):
the image size is fixed in the graph, the batch size N is dynamic (``dynamic_batch``).
ONNX uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): with
torch >= 2.9 the default ``dynamo=True`` path needs ``onnxscript`` and re-traces through
``torch.export``; the TorchScript-based path needs only ``onnx`` and exports grid_sample
(deformable attention's pure-PyTorch kernel) as the ONNX ``GridSample`` op, opset >= 16.
"""
import os
import warnings
from typing import Callable, Dict

import torch
from torch import nn

from ..modeling.transformer.ms_deform_attn import MSDeformAttn
from .errors import ExportError, require_package

__all__ = [
    "EXPORTERS",
    "INPUT_NAMES",
    "MIN_OPSET_GRID_SAMPLE",
    "OUTPUT_NAMES",
    "check_opset",
    "export_onnx",
    "export_torchscript",
]

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
MIN_OPSET_GRID_SAMPLE = 16  # ONNX GridSample appeared in opset 16
DEFAULT_OPSET = 17


def uses_grid_sample(model: nn.Module) -> bool:
    """Whether ``model`` has multi-scale deformable attention (sampled with grid_sample)."""
    return any(isinstance(m, MSDeformAttn) for m in model.modules())


def check_opset(model: nn.Module, opset: int) -> None:
    """Raise :class:`ExportError` when ``opset`` cannot express the model's ops."""
    if opset < MIN_OPSET_GRID_SAMPLE and uses_grid_sample(model):
        raise ExportError(
            f"opset {opset} has no GridSample, which deformable attention needs. Fix: --opset "
            f"{MIN_OPSET_GRID_SAMPLE} or higher (default {DEFAULT_OPSET})"
        )


def _quiet_trace(adapter: nn.Module, fn: Callable):
    """Run ``fn`` (which traces ``adapter``) with trace-friendly open-vocabulary heads and without
    the tracer's warnings about Python values frozen into the graph (the image size and the
    model's constants are meant to be frozen)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        with torch.no_grad():
            return fn()


def export_onnx(
    adapter: nn.Module,
    images: torch.Tensor,
    orig_target_sizes: torch.Tensor,
    path: str,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> str:
    """Trace ``adapter`` on (images (N, 3, H, W), orig_target_sizes (N, 2)) into ONNX at ``path``.

    Raises:
        ExportError: without the ``onnx`` package, or with an opset too low for the model.
    """
    require_package("onnx", extra="export")
    check_opset(adapter, opset)
    axes: Dict[str, Dict[int, str]] = {}
    if dynamic_batch:
        axes = {name: {0: "N"} for name in INPUT_NAMES + OUTPUT_NAMES}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _quiet_trace(
        adapter,
        lambda: torch.onnx.export(
            adapter,
            (images, orig_target_sizes),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    )
    return path


def export_torchscript(
    adapter: nn.Module,
    images: torch.Tensor,
    orig_target_sizes: torch.Tensor,
    path: str,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> str:
    """Trace ``adapter`` with ``torch.jit.trace`` and save it at ``path`` (``opset`` unused).

    Traced shape arithmetic on the batch dimension stays symbolic, so the saved module accepts
    any N (``dynamic_batch`` is always true for TorchScript)."""
    del opset, dynamic_batch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    traced = _quiet_trace(
        adapter,
        lambda: torch.jit.trace(adapter, (images, orig_target_sizes), check_trace=False)
    )
    traced.save(path)
    return path


# format -> (file name, exporter)
EXPORTERS = {
    "onnx": ("model.onnx", export_onnx),
    "torchscript": ("model.ts", export_torchscript),
}
