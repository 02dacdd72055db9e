# Copyright (c) kd_detr contributors.
"""``--run-eval``: Detectron2's evaluator on ``DATASETS.TEST`` for the exported model and for the
eager model, both fed the same fixed-size test loader (the export size), so the APs compare the
graph and not the resize."""
from typing import Callable, Dict, Sequence

from torch import nn

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset

from ..evaluation import build_evaluator
from .predictor import ExportedModel, export_resize

__all__ = ["evaluate_exported", "fixed_size_test_loader"]


def fixed_size_test_loader(cfg, dataset_name: str, image_size: Sequence[int]):
    """Detectron2's test loader (one image per batch) of ``dataset_name`` with the images
    resized to (H, W)."""
    mapper = DatasetMapper(
        is_train=False, augmentations=[export_resize(image_size)], image_format=cfg.INPUT.FORMAT
    )
    return build_detection_test_loader(
        dataset=DatasetCatalog.get(dataset_name),
        mapper=mapper,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def evaluate_exported(
    cfg,
    model: nn.Module,
    runner: Callable,
    image_size: Sequence[int],
    output_dir: str = None,
) -> Dict[str, Dict]:
    """Evaluate the eager ``model`` and the exported ``runner`` on every ``DATASETS.TEST`` set.

    Returns:
        {dataset name: {"eager": results, "exported": results}}, results as returned by the
        evaluator of ``TEST.EVALUATOR`` (e.g. {"bbox": {"AP": ..., ...}}).
    """
    results = {}
    for name in cfg.DATASETS.TEST:
        per_model = {}
        for key, predictor in (("eager", model), ("exported", ExportedModel(runner))):
            loader = fixed_size_test_loader(cfg, name, image_size)
            evaluator = build_evaluator(cfg, name, output_dir)
            per_model[key] = inference_on_dataset(predictor, loader, evaluator)
        results[name] = per_model
    return results
