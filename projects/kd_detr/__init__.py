# Copyright (c) kd_detr contributors.
"""kd_detr: knowledge distillation for DETR-family detectors on Detectron2.

Layers, bottom to top (a package imports only packages below it; features register into
registries owned below, see docs/ARCHITECTURE.md): utils -> compat -> evaluation -> data ->
config -> modeling -> checkpoint -> distill -> ov -> engine. Importing the package imports every
layer, which registers everything: config keys, datasets and dataset sources, training loaders,
evaluators, backbones, class heads, meta-architectures, ROI heads, checkpoint converters, KD
terms and pairings.
"""
import warnings

# fvcore.nn.focal_loss (imported by detectron2.layers) and detectron2.modeling.box_regression call
# torch.jit.script at import time; torch >= 2.10 deprecates it with a FutureWarning that every
# command printed twice. kd_detr itself never scripts. Only those two third-party imports are
# silenced (the filter is undone after them), so a torch.jit.script call anywhere else still warns.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
    )
    import fvcore.nn  # noqa: F401  isort: skip
    import detectron2.modeling  # noqa: F401  isort: skip

from . import utils, compat, evaluation, data, config, modeling  # noqa: F401  (isort: skip)
from . import checkpoint, distill, ov, engine  # noqa: F401  (isort: skip)
from .config import add_kd_detr_config, load_config

__version__ = "0.1.0"
