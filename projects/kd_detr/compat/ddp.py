# Copyright (c) kd_detr contributors.
"""DistributedDataParallel for models on CPU, as Detectron2's ``create_ddp_model`` builds it.

``detectron2.engine.defaults.create_ddp_model`` (v0.6 and main) always passes
``device_ids=[local_rank]``, which DDP rejects for CPU modules. ``create_ddp_model`` here passes
``device_ids=None`` for CPU models and defers to Detectron2 otherwise;
``patch_detectron2_create_ddp_model`` installs it for ``DefaultTrainer.__init__``.
"""
import contextlib

from detectron2.engine import defaults as d2_defaults

_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model, **kwargs):
    """Like :func:`detectron2.engine.defaults.create_ddp_model`, also for CPU models."""
    params = list(model.parameters())
    if params and params[0].device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def patch_detectron2_create_ddp_model():
    """Within the block, ``DefaultTrainer.__init__`` wraps CPU models in DDP correctly."""
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model
