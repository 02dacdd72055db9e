# Copyright (c) kd_detr contributors.
"""``EVALUATOR_REGISTRY`` and ``build_evaluator`` (``TEST.EVALUATOR``)."""
from ..utils import NamedRegistry

__all__ = ["EVALUATOR_REGISTRY", "build_evaluator"]

EVALUATOR_REGISTRY = NamedRegistry("EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = """
Dataset evaluators selectable by ``cfg.TEST.EVALUATOR``: ``coco`` here (faster-coco-eval box AP);
``kd_detr.ov`` adds ``coco_ovd`` (novel / base AP50) and ``lvis`` (AP, APr / APc / APf).

Each entry is a Detectron2 ``DatasetEvaluator`` class called as
``cls(dataset_name, output_dir=folder)``; register it with
``@EVALUATOR_REGISTRY.register(name="...")``.
"""


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator named by ``cfg.TEST.EVALUATOR`` (default "coco") for one dataset.

    Args:
        cfg: a config with kd_detr's keys (``add_kd_detr_config``).
        dataset_name: registered dataset to evaluate on.
        output_folder: where the evaluator writes its files (None: nowhere).

    Raises:
        ValueError: for an unknown evaluator name, listing the registered ones.
    """
    name = cfg.TEST.get("EVALUATOR", "coco")
    if name not in EVALUATOR_REGISTRY:
        raise ValueError(
            f"Unknown cfg.TEST.EVALUATOR {name!r}; valid names: "
            f"{', '.join(sorted(EVALUATOR_REGISTRY.names()))}"
        )
    return EVALUATOR_REGISTRY.get(name)(dataset_name, output_dir=output_folder)
