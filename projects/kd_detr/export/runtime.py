# Copyright (c) kd_detr contributors.
"""Runners of exported models: ONNX Runtime, TorchScript, OpenVINO, and the eager adapter.

Every runner is called as ``runner(images, orig_target_sizes)`` with images (N, 3, H, W) float32
and sizes (N, 2) (width, height), numpy arrays or tensors, and returns numpy ``labels`` (N, k)
int64, ``boxes`` (N, k, 4) float32 xyxy original pixels and ``scores`` (N, k) float32.
The optional runtimes are imported lazily (optional dependencies).
"""
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch import nn

from .errors import ExportError, require_package

__all__ = ["RUNTIMES", "EagerRunner", "build_runner"]

Outputs = Tuple[np.ndarray, np.ndarray, np.ndarray]


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _outputs(labels, boxes, scores) -> Outputs:
    return _numpy(labels, np.int64), _numpy(boxes, np.float32), _numpy(scores, np.float32)


class EagerRunner:
    """The eager (PyTorch) export adapter behind the runner interface."""

    name = "eager"

    def __init__(self, adapter: nn.Module):
        self.adapter = adapter.eval()

    def __call__(self, images, orig_target_sizes) -> Outputs:
        images = torch.as_tensor(_numpy(images, np.float32))
        sizes = torch.as_tensor(_numpy(orig_target_sizes, np.int64))
        with torch.no_grad():
            return _outputs(*self.adapter(images, sizes))


class OnnxRuntimeRunner:
    """An ONNX file in an ONNX Runtime CPU session (all graph optimisations)."""

    name = "onnxruntime"

    def __init__(self, path: str, num_threads: int = 0):
        ort = require_package("onnxruntime", extra="export")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads > 0:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images, orig_target_sizes) -> Outputs:
        feeds = {
            "images": _numpy(images, np.float32),
            "orig_target_sizes": _numpy(orig_target_sizes, np.int64),
        }
        return _outputs(*self.session.run(["labels", "boxes", "scores"], feeds))


class OpenVINORunner:
    """An ONNX file compiled by OpenVINO for the CPU (f32 inference precision)."""

    name = "openvino"

    def __init__(self, path: str, num_threads: int = 0):
        ov = require_package("openvino", extra="openvino")
        # f32 everywhere: OpenVINO may otherwise pick bf16 / f16 on CPUs that have them.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads > 0:
            config["INFERENCE_NUM_THREADS"] = num_threads
        self.compiled = ov.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images, orig_target_sizes) -> Outputs:
        results = self.request.infer(
            {
                "images": _numpy(images, np.float32),
                "orig_target_sizes": _numpy(orig_target_sizes, np.int64),
            }
        )
        by_name = {out.get_any_name(): value for out, value in results.items()}
        return _outputs(by_name["labels"], by_name["boxes"], by_name["scores"])


class TorchScriptRunner:
    """A TorchScript file saved by :func:`kd_detr.export.exporters.export_torchscript`."""

    name = "torchscript"

    def __init__(self, path: str, num_threads: int = 0):
        del num_threads  # torch's own setting (torch.set_num_threads) applies
        self.module = torch.jit.load(path, map_location="cpu").eval()

    def __call__(self, images, orig_target_sizes) -> Outputs:
        images = torch.as_tensor(_numpy(images, np.float32))
        sizes = torch.as_tensor(_numpy(orig_target_sizes, np.int64))
        with torch.no_grad():
            return _outputs(*self.module(images, sizes))


# runtime name -> runner class (path, num_threads)
RUNTIMES: Dict[str, Callable] = {
    "onnxruntime": OnnxRuntimeRunner,
    "openvino": OpenVINORunner,
    "torchscript": TorchScriptRunner,
}
# default runtime of an exported file, by extension
_DEFAULT_RUNTIME = {".onnx": "onnxruntime", ".ts": "torchscript", ".pt": "torchscript"}


def build_runner(path: str, runtime: str = "", num_threads: int = 0):
    """A runner for the exported file ``path`` (runtime by extension unless named).

    Raises:
        ExportError: for an unknown runtime or a missing runtime package.
    """
    if not runtime:
        ext = "." + path.rsplit(".", 1)[-1] if "." in path else ""
        runtime = _DEFAULT_RUNTIME.get(ext, "")
    if runtime not in RUNTIMES:
        raise ExportError(
            f"no runtime for {path!r} (runtime {runtime!r}). Fix: name one of "
            f"{', '.join(sorted(RUNTIMES))}, or use a .onnx / .ts file"
        )
    return RUNTIMES[runtime](path, num_threads)
