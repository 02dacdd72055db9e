# Copyright (c) kd_detr contributors.
"""Deployment of DETR-family students: export adapters (RT-DETR contract ``(images,
orig_target_sizes) -> (labels, boxes, scores)``), ONNX / TorchScript exporters, runtimes
(ONNX Runtime, OpenVINO, TorchScript), checks against the eager model and exported-model
evaluation. See tools/export_model.py and tools/demo.py."""
from .adapters import (
    EXPORT_ADAPTERS,
    DETRFamilyExportAdapter,
    build_export_adapter,
    register_export_adapter,
)
from .api import (
    EXPORT_OPTS,
    class_names,
    default_image_size,
    export_model,
    load_export_config,
    load_model,
)
from .check import check_onnx_file, compare_instances, compare_on_images, load_batch
from .errors import ExportError, require_package
from .evaluation import evaluate_exported, fixed_size_test_loader
from .exporters import (
    DEFAULT_OPSET,
    EXPORTERS,
    MIN_OPSET_GRID_SAMPLE,
    check_opset,
    export_onnx,
    export_torchscript,
)
from .metadata import METADATA_FILE, read_export_metadata, write_export_metadata
from .postprocess import topk_detections
from .predictor import (
    ExportedModel,
    ExportedPredictor,
    batch_arrays,
    detections_to_instances,
    export_resize,
    resize_image,
)
from .runtime import RUNTIMES, EagerRunner, build_runner
