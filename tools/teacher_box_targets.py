#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""How good a teacher's KD targets are at boxes near objects (``MODEL.KD.POINTS boxes``).

For every object of a dataset, boxes are drawn at given IoU bins with it (the object's box
shifted and rescaled at random) and evaluated by the model through the box-evaluation interface
that distillation uses (:func:`kd_detr.distill.box_evaluation.build_box_evaluator`: extra query
groups for a DETR, ROI heads for an R-CNN). Printed per bin: the mean IoU of the model's refined
box with the object (how far it moves a box onto the object) and its mean foreground probability
(the point's KD weight), e.g. to compare a Faster R-CNN and a DETR teacher for one student:

    python tools/teacher_box_targets.py \
        --config-file configs/demo/faster_rcnn_efflite2_fpn_demo.yaml --weights TEACHER.pth \
        [--dataset kd_demo_val] [--images 40] [--per-object 3]
"""
import kd_detr  # noqa: F401  isort: skip  (first: registers everything)

import argparse
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from tabulate import tabulate

BINS = ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.95))


def iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (4,) xyxy boxes."""
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])) - inter
    return inter / union if union > 0 else 0.0


def box_near(gt: np.ndarray, low: float, high: float, rng, tries: int = 10000):
    """A normalised xyxy box inside the image with ``low <= IoU(box, gt) < high``, or None."""
    centre, size = (gt[:2] + gt[2:]) / 2, gt[2:] - gt[:2]
    for _ in range(tries):
        s = rng.uniform(-1, 1, 4)
        c, wh = centre + s[:2] * size, size * np.exp(0.7 * s[2:])
        box = np.clip(np.r_[c - wh / 2, c + wh / 2], 0.0, 1.0)
        if (box[2:] - box[:2]).min() > 0.01 and low <= iou_xyxy(box, gt) < high:
            return box
    return None


def measure(evaluator, samples: Iterable[Tuple[Dict, List[np.ndarray]]], bins=BINS,
            per_object: int = 3, seed: int = 0) -> List[Dict]:  # fmt: skip
    """Refined-box IoU and foreground probability per IoU bin.

    Args:
        evaluator: a :class:`~kd_detr.distill.box_evaluation.BoxEvaluator`.
        samples: (model input dict, [normalised xyxy (4,) object boxes]) per image.
        bins: (low, high) IoU ranges of the drawn boxes.

    Returns:
        per bin {"bin", "boxes", "input_iou", "refined_iou", "foreground"} (means).
    """
    rng = np.random.default_rng(seed)
    found = {b: [] for b in bins}  # (input IoU, refined IoU, foreground probability)
    for model_input, objects in samples:
        boxes, owners = [], []
        for gt in objects:
            for b in bins:
                for _ in range(per_object):
                    box = box_near(gt, *b, rng)
                    if box is not None:
                        boxes.append(box)
                        owners.append((gt, b))
        if not boxes:
            continue
        xyxy = torch.tensor(np.array(boxes), dtype=torch.float32)
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        with torch.no_grad():
            images = evaluator.preprocess_image([model_input])
            out = evaluator.evaluate_boxes(images, [cxcywh[None]])[0]
        refined = out["pred_boxes"][-1, 0].double().numpy()
        logits = out["pred_logits"][-1, 0].double()
        probs = logits.softmax(-1)[:, :-1] if evaluator.softmax else logits.sigmoid()
        foreground = probs.max(-1).values.numpy()
        for k, (gt, b) in enumerate(owners):
            r = np.r_[refined[k, :2] - refined[k, 2:] / 2, refined[k, :2] + refined[k, 2:] / 2]
            found[b].append((iou_xyxy(boxes[k], gt), iou_xyxy(r, gt), foreground[k]))
    rows = []
    for b in bins:
        values = np.array(found[b]).reshape(-1, 3)
        means = values.mean(0) if len(values) else [float("nan")] * 3
        rows.append({"bin": b, "boxes": len(values), "input_iou": float(means[0]),
                     "refined_iou": float(means[1]), "foreground": float(means[2])})  # fmt: skip
    return rows


def dataset_samples(cfg, dataset: str, num_images: int):
    """(test-time model input, normalised xyxy object boxes) of the first images of
    ``dataset`` (a registered Detectron2 dataset)."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.structures import BoxMode

    mapper = DatasetMapper(cfg, is_train=False)
    for record in DatasetCatalog.get(dataset)[:num_images]:
        scale = np.array([record["width"], record["height"]] * 2, dtype=np.float64)
        objects = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) / scale
                   for a in record.get("annotations", [])]  # fmt: skip
        yield mapper(record), [np.asarray(o, dtype=np.float64) for o in objects]


def main(argv: Sequence[str] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="the model's checkpoint")
    parser.add_argument("--dataset", default=None, help="registered dataset (DATASETS.TEST[0])")
    parser.add_argument("--images", type=int, default=40, help="images used (default 40)")
    parser.add_argument("--per-object", type=int, default=3, help="boxes per object and bin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from kd_detr.config import load_config
    from kd_detr.distill.box_evaluation import build_box_evaluator

    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", args.weights])
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if not dataset:
        parser.error("the config has no DATASETS.TEST: name one with --dataset")
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(args.weights)
    rows = measure(build_box_evaluator(model), dataset_samples(cfg, dataset, args.images),
                   per_object=args.per_object, seed=args.seed)  # fmt: skip
    print(f"{type(model).__name__} ({args.config_file}) on {dataset}, {args.images} images:")
    print(tabulate([[f"{r['bin'][0]:.1f}-{r['bin'][1]:.2f}", r["boxes"], f"{r['input_iou']:.3f}",
                     f"{r['refined_iou']:.3f}", f"{r['foreground']:.3f}"] for r in rows],
                   headers=["IoU bin", "boxes", "input IoU", "refined IoU", "foreground prob"]))
    return rows


if __name__ == "__main__":
    main()
