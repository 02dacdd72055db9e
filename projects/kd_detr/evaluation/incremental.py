# Copyright (c) kd_detr contributors.
"""``coco_incremental``: COCO box AP / AP50 of the base, the novel and all classes of a
class-incremental split (Incremental-DETR's evaluation).

Each group is a COCO evaluation with ``params.catIds`` restricted to the group's categories
(faster-coco-eval, equal to pycocotools with ``catIds`` set): AP is the mean over the group's
classes with ground truth, as COCO's AP is over all classes. The dataset's metadata names the base
classes (``incremental_base_classes``, contiguous ids; ``incremental_novel_classes`` optional,
default every other class), as the ``DATASETS.INCREMENTAL`` split's ``<NAME>_val`` sets them.
"""
import logging
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from .build import EVALUATOR_REGISTRY
from .coco_evaluation import COCOBoxEvalResult, FastCOCOEvaluator, evaluate_coco_boxes

__all__ = ["INCREMENTAL_GROUPS", "COCOIncrementalEvaluator"]

logger = logging.getLogger(__name__)

INCREMENTAL_GROUPS = ("base", "novel", "all")


def _percent(value) -> float:
    value = float(value)
    return value * 100.0 if value >= 0 else float("nan")


@EVALUATOR_REGISTRY.register(name="coco_incremental")
class COCOIncrementalEvaluator(FastCOCOEvaluator):
    """FastCOCOEvaluator adding ``AP-<group>`` and ``AP50-<group>`` (percent) for the groups
    "base", "novel" and "all" (NaN for a group without ground truth in the evaluated images).
    The group results are kept in ``self.last_group_results`` ({group: COCOBoxEvalResult}).

    Raises:
        ValueError: the dataset's metadata names no base classes, or ids outside its classes.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, **kwargs):
        super().__init__(dataset_name, output_dir=output_dir, **kwargs)
        base = self._metadata.get("incremental_base_classes", None)
        if base is None:
            raise ValueError(
                f"TEST.EVALUATOR 'coco_incremental' needs the base classes of dataset "
                f"{dataset_name!r} (metadata 'incremental_base_classes'): evaluate the <NAME>_val "
                "dataset of a DATASETS.INCREMENTAL split (e.g. 'kd_demo_incremental_val')."
            )
        num = len(self._reverse_id_map)
        novel = self._metadata.get("incremental_novel_classes", None)
        if novel is None:
            novel = [c for c in range(num) if c not in set(base)]
        bad = [c for c in list(base) + list(novel) if not 0 <= int(c) < num]
        if bad:
            raise ValueError(
                f"Dataset {dataset_name!r}: base / novel class ids {bad} are outside its {num} "
                "classes (contiguous 0-based ids expected)."
            )
        to_dataset = self._reverse_id_map
        self._groups: Dict[str, List[int]] = {
            "base": [to_dataset[int(c)] for c in base],
            "novel": [to_dataset[int(c)] for c in novel],
            "all": [to_dataset[c] for c in range(num)],
        }
        self._img_ids: Optional[Sequence[int]] = None
        self._dataset_results: List[dict] = []

    def reset(self):
        super().reset()
        self.last_group_results: Dict[str, COCOBoxEvalResult] = {}

    def evaluate(self, img_ids: Optional[Sequence[int]] = None):
        self._img_ids = img_ids
        return super().evaluate(img_ids=img_ids)

    def _to_dataset_ids(self, coco_results) -> List[dict]:
        self._dataset_results = super()._to_dataset_ids(coco_results)
        return self._dataset_results

    def _derive_results(self, result: COCOBoxEvalResult) -> Dict[str, float]:
        metrics = super()._derive_results(result)
        rows = []
        for group in INCREMENTAL_GROUPS:
            ids = self._groups[group]
            if not ids:
                metrics[f"AP-{group}"] = metrics[f"AP50-{group}"] = float("nan")
                continue
            res = evaluate_coco_boxes(
                self._coco_api,
                self._dataset_results,
                img_ids=self._img_ids,
                max_dets=self._max_dets,
                cat_ids=ids,
            )
            self.last_group_results[group] = res
            metrics[f"AP-{group}"] = _percent(res.stats[0])
            metrics[f"AP50-{group}"] = _percent(res.stats[1])
            rows.append((group, len(ids), metrics[f"AP-{group}"], metrics[f"AP50-{group}"]))
        logger.info(
            "Incremental split, box AP (%):\n"
            + tabulate(rows, headers=["classes", "count", "AP", "AP50"], floatfmt=".3f")
        )
        return metrics
