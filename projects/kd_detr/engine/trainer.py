# Copyright (c) kd_detr contributors.
"""``Trainer``: Detectron2's DefaultTrainer with kd_detr's evaluators and CPU-DDP support."""
import json
import logging
import math
import numbers
import os

from detectron2.engine import DefaultTrainer
from detectron2.utils import comm

from ..checkpoint import resume_load_policy, weights_load_policy
from ..compat.ddp import patch_detectron2_create_ddp_model
from ..data import build_test_loader, build_train_loader
from ..evaluation import build_evaluator
from .checkpointing import check_output_dir_is_free, safe_checkpointer_in_default_trainer
from .optimizer import build_optimizer

__all__ = ["Trainer", "json_safe", "write_metrics_json"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """DefaultTrainer with kd_detr's optimizer (AdamW/SGD, lr multipliers, full-model clipping),
    training mappers (``TRAIN_MAPPER_REGISTRY``: DETR crop, ...) and evaluators
    (``cfg.TEST.EVALUATOR`` in ``EVALUATOR_REGISTRY``).

    Multi-process runs on CPU wrap the model in DDP without ``device_ids`` (see
    :mod:`kd_detr.compat.ddp`), and checkpoints hold the optimizer state on every Detectron2
    version; everything else is Detectron2's DefaultTrainer.
    """

    def __init__(self, cfg):
        with patch_detectron2_create_ddp_model(), safe_checkpointer_in_default_trainer():
            super().__init__(cfg)

    def resume_or_load(self, resume=True):
        """DefaultTrainer's, with kd_detr's guards: a fresh run never overwrites another run's
        checkpoints (``check_output_dir_is_free``); ``--resume`` needs a checkpoint of this very
        model; ``MODEL.WEIGHTS`` must fill the model (``MODEL.WEIGHTS_MIN_LOADED_PERCENT``)."""
        checkpointer = self.checkpointer
        if resume and checkpointer.has_checkpoint():
            checkpointer.load_policy = resume_load_policy(checkpointer.model, self.cfg.OUTPUT_DIR)
        else:
            check_output_dir_is_free(self.cfg)
            checkpointer.load_policy = weights_load_policy(
                checkpointer.model, min_loaded=self.cfg.MODEL.WEIGHTS_MIN_LOADED_PERCENT / 100.0
            )
        try:
            super().resume_or_load(resume=resume)
        finally:
            checkpointer.load_policy = None

    # Detectron2 v0.6's DefaultTrainer checkpoints only the iteration and hook states; later
    # versions also save the inner trainer's (optimizer, AMP grad scaler) under "_trainer".
    def state_dict(self):
        ret = super().state_dict()
        if "_trainer" not in ret:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict and "load_state_dict" not in DefaultTrainer.__dict__:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """The config's training loader (``kd_detr.data.build_train_loader``: the mapper of
        ``TRAIN_MAPPER_REGISTRY`` whose switch is on, DETR crop, ViLD regions, ..., else
        Detectron2's; unreadable images follow ``DATALOADER.ON_BAD_IMAGE``)."""
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader; an unreadable image stops with the file named."""
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)


def write_metrics_json(cfg, results, extra=None):
    """Write evaluation ``results`` (and ``extra`` fields) as JSON; returns the path (main rank).

    The file holds ``{"results": {dataset: {task: {metric: value}}}, **extra}``, AP values in
    percent. It is strict JSON: an undefined metric (NaN, e.g. ``APl`` when the split has no large
    object, or a class without ground truth) is written as ``null``, never as a bare ``NaN``.
    """
    if not comm.is_main_process():
        return None
    path = cfg.TEST.METRICS_JSON or os.path.join(cfg.OUTPUT_DIR, "metrics_final.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    results = dict(results or {})
    # DefaultTrainer.test unwraps the dataset level when there is a single test dataset.
    if len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
        results = {cfg.DATASETS.TEST[0]: results}
    payload = {"results": results, **(extra or {})}
    with open(path, "w") as f:
        json.dump(json_safe(payload), f, indent=2, allow_nan=False)
    logger.info(f"Wrote final metrics to {path}")
    return path


def json_safe(value):
    """``value`` with numpy / torch scalars as Python numbers and NaN / infinity as ``None``
    (nested dicts, lists and tuples), so that ``json.dump(..., allow_nan=False)`` accepts it."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy / torch 0-d values
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
