# Copyright (c) kd_detr contributors.
"""Region proposals for ViLD-image: from a proposals file or a (class-agnostic) RPN model."""
import json
import pickle
from typing import Dict, Tuple

import numpy as np
import torch

from detectron2.structures import BoxMode

__all__ = ["RPNProposals", "load_proposals_file", "top_proposals"]

Proposals = Tuple[np.ndarray, np.ndarray]  # (K, 4) XYXY_ABS boxes, (K,) scores


def _from_detectron2_pkl(path: str) -> Dict[str, Proposals]:
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Detectron2 proposals pkl is a dict, got {type(data)}")
    data = {{"indexes": "ids", "scores": "objectness_logits"}.get(k, k): v for k, v in data.items()}
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in data]
    if missing:
        raise ValueError(f"{path}: not a Detectron2 proposals file, it lacks the keys {missing}")
    mode = BoxMode(data.get("bbox_mode", BoxMode.XYXY_ABS))
    out = {}
    for image_id, boxes, logits in zip(data["ids"], data["boxes"], data["objectness_logits"]):
        boxes = BoxMode.convert(np.asarray(boxes, dtype=np.float32), mode, BoxMode.XYXY_ABS)
        out[str(image_id)] = (np.asarray(boxes, np.float32), np.asarray(logits, np.float32))
    return out


def _from_coco_results(path: str) -> Dict[str, Proposals]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or any(
        not isinstance(d, dict) or not {"image_id", "bbox"} <= set(d) for d in data
    ):
        raise ValueError(
            f"{path}: a COCO-style proposals json is a list of {{'image_id', 'bbox' [x, y, w, h], "
            "'score'}} entries"
        )
    grouped: Dict[str, list] = {}
    for d in data:
        x, y, w, h = d["bbox"]
        grouped.setdefault(str(d["image_id"]), []).append((x, y, x + w, y + h, d.get("score", 1.0)))
    return {
        k: (np.asarray(v, np.float32)[:, :4], np.asarray(v, np.float32)[:, 4])
        for k, v in grouped.items()
    }


def load_proposals_file(path: str) -> Dict[str, Proposals]:
    """Proposals per image id (as a string) from a Detectron2 proposals ``.pkl`` ("ids",
    "boxes", "objectness_logits", "bbox_mode") or a COCO results-style ``.json`` list of
    ``{"image_id", "bbox": [x, y, w, h], "score"}``. Boxes come back XYXY_ABS."""
    if path.endswith((".pkl", ".pickle")):
        return _from_detectron2_pkl(path)
    if path.endswith(".json"):
        return _from_coco_results(path)
    raise ValueError(f"Unknown proposals file type {path!r}: use a Detectron2 .pkl or a .json")


def top_proposals(
    boxes: np.ndarray, scores: np.ndarray, num: int, min_size: float = 1.0
) -> Proposals:
    """The ``num`` highest-scoring proposals whose sides are at least ``min_size`` pixels, by
    decreasing score (ties keep the input order)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:num]
    return boxes[order], scores[order]


class RPNProposals:
    """Proposals of a trained Detectron2 model's RPN (e.g. a class-agnostic RPN trained on the
    base classes), at its test input size, in original image pixels."""

    def __init__(self, cfg, weights: str):
        """
        Args:
            cfg: the model's config (``MODEL.PROPOSAL_GENERATOR`` an RPN; ``INPUT.*_TEST``).
            weights: checkpoint path loaded with DetectionCheckpointer.
        """
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model

        self.model = build_model(cfg).eval()
        if getattr(self.model, "proposal_generator", None) is None:
            raise ValueError(f"{cfg.MODEL.META_ARCHITECTURE} has no proposal generator (RPN)")
        DetectionCheckpointer(self.model).load(weights)
        size = cfg.INPUT.MIN_SIZE_TEST
        self.resize = T.ResizeShortestEdge([size, size], cfg.INPUT.MAX_SIZE_TEST)
        self.format = cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Proposals:
        """Proposals of one (H, W, 3) RGB uint8 image: (K, 4) XYXY boxes, (K,) objectness."""
        height, width = image.shape[:2]
        if self.format == "BGR":
            image = image[:, :, ::-1]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        images = self.model.preprocess_image([{"image": tensor}])
        features = self.model.backbone(images.tensor)
        proposals, _ = self.model.proposal_generator(images, features, None)
        boxes = proposals[0].proposal_boxes.tensor.cpu().numpy()
        boxes = boxes * np.float32([width / resized.shape[1], height / resized.shape[0]] * 2)
        return boxes.astype(np.float32), proposals[0].objectness_logits.cpu().numpy()
