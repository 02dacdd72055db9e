# Copyright (c) kd_detr contributors.
"""Box evaluation: the interface through which any detector can be a teacher or student of
distillation at shared boxes, and ``BOX_EVALUATOR_REGISTRY``, its adapters per meta-architecture.

A model *evaluates* a box when it returns its class logits and its refined box at that box:
a DETR-family model decodes the box as an extra box query group (every decoder layer); a
Faster R-CNN pools the box through its ROI heads as a proposal (class scores + box deltas applied
to the box). Distillation points are then boxes that both models evaluate, whatever their
architecture (``MODEL.KD.POINTS "boxes"``, :mod:`.box_pairing`).

The models live in lower layers (``kd_detr.modeling``, Detectron2), so the adapters live here,
registered under the name of the meta-architecture class they serve; :func:`build_box_evaluator`
looks a model's classes up along its MRO (``ViLDRCNN`` is served by the ``GeneralizedRCNN``
adapter, ``DINO`` by the ``DETR`` one).

Boxes are normalised cxcywh relative to each image's unpadded network-input size (the
convention of DETR's targets and predictions).
"""
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import nn

from detectron2.structures import Boxes, ImageList

from ..modeling.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..utils import NamedRegistry

__all__ = [
    "BOX_EVALUATOR_REGISTRY",
    "BoxEvaluator",
    "DETRBoxEvaluator",
    "RCNNBoxEvaluator",
    "build_box_evaluator",
    "fixed_count_boxes",
]

BOX_EVALUATOR_REGISTRY = NamedRegistry("BOX_EVALUATOR")
BOX_EVALUATOR_REGISTRY.__doc__ = """
Adapters that let a detector evaluate given boxes (:class:`BoxEvaluator`), keyed by the name of
the meta-architecture class they serve. ``build_box_evaluator(model)`` walks
``type(model).__mro__`` and builds the first registered adapter as ``cls(model)``; the adapter
raises a ValueError naming the model and the missing piece when the model cannot evaluate boxes
(e.g. vanilla DETR, which has no box queries, or a cascade R-CNN).
"""


@runtime_checkable
class BoxEvaluator(Protocol):
    """What a detector provides to distil (or be distilled) at shared boxes.

    Attributes:
        model (nn.Module): the served model (not DDP-wrapped).
        softmax (bool): class logits are softmax with background last (K = C + 1), else
            sigmoid / focal (K = C).
        num_classes (int): C.
        groups_in_forward (bool): True when the boxes must be known before the training
            forward (DETR decodes them with its queries); False when the model evaluates them
            afterwards on the features of its training forward (R-CNN).
    """

    model: nn.Module
    softmax: bool
    num_classes: int
    groups_in_forward: bool

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalised, padded images of a batch of Detectron2 dataset dicts."""

    def evaluate_boxes(
        self, images: ImageList, groups: Sequence[torch.Tensor], state: Optional[Dict] = None
    ) -> List[Dict[str, torch.Tensor]]:
        """Class logits and refined boxes at every box of every group.

        Args:
            images (ImageList): from :meth:`preprocess_image`.
            groups: per group, (B or 1, M, 4) normalised cxcywh boxes.
            state (dict or None): what :meth:`train_forward` returned, to reuse its features.

        Returns:
            per group: {"pred_logits" (L, B, M, K), "pred_boxes" (L, B, M, 4)}, L = every
            decoder layer (DETR) or 1 (R-CNN).
        """

    def teach(
        self, images: ImageList, groups: Sequence[torch.Tensor], num_own: int
    ) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
        """One pass of a teacher: its own boxes with its outputs at them, and ``groups``
        evaluated. Returns ({"boxes" (B, N, 4), "pred_logits" (L, B, N, K), "pred_boxes"
        (L, B, N, 4)}, [per group as :meth:`evaluate_boxes`]); N <= ``num_own`` (0: all)."""

    def train_forward(
        self, model: nn.Module, batched_inputs: List[Dict], groups: Sequence[torch.Tensor]
    ) -> Tuple[Dict[str, torch.Tensor], Dict]:
        """The student's training forward through ``model`` (possibly DDP-wrapped): its
        detection losses and a state: {"groups": outputs of ``groups``} when
        ``groups_in_forward``, else what :meth:`evaluate_boxes` and :meth:`own_proposals`
        reuse (images, features, proposals)."""

    def own_proposals(self, state: Dict, num: int) -> Optional[torch.Tensor]:
        """(B, num, 4) of the student's own proposals in its training forward, or None when it
        has none."""


def _as_batch(boxes: torch.Tensor, batch_size: int) -> torch.Tensor:
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] not in (1, batch_size):
        raise ValueError(
            f"box groups must be (B={batch_size} or 1, M, 4), got {tuple(boxes.shape)}"
        )
    return boxes.expand(batch_size, -1, -1)


def fixed_count_boxes(per_image: Sequence[torch.Tensor], num: int) -> torch.Tensor:
    """(B, num, 4) boxes from per-image (n_i, 4) boxes (best first): the first ``num``; an image
    with fewer repeats its boxes cyclically, one without any gets the whole image
    (0.5, 0.5, 1, 1).

    Args:
        per_image: per image, (n_i, 4) normalised cxcywh.
        num (int): boxes per image.
    """
    out = []
    for boxes in per_image:
        if boxes.shape[0] == 0:
            boxes = boxes.new_tensor([[0.5, 0.5, 1.0, 1.0]])
        reps = -(-num // boxes.shape[0])
        out.append(boxes.repeat(reps, 1)[:num])
    return torch.stack(out)


def _group_outputs(outputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
    keys = ("pred_logits", "pred_boxes")
    return [{k: group[k] for k in keys} for group in outputs]


@BOX_EVALUATOR_REGISTRY.register(name="DETR")
class DETRBoxEvaluator:
    """DETR-family models (DAB-DETR, Deformable DETR, DINO, RT-DETR, D-FINE): boxes are decoded
    as extra box query groups with zero content (``forward_raw(images, extra_query_groups)``),
    every decoder layer. A teacher's own boxes are its final predicted boxes of its detection
    queries (the ``num_own`` best by foreground score when fewer than its queries), its targets
    there its detection outputs."""

    groups_in_forward = True

    def __init__(self, model: nn.Module):
        if not getattr(model, "box_query_groups", False):
            raise ValueError(
                f"{type(model).__name__} cannot evaluate boxes: it has no box queries to decode "
                "them (vanilla DETR decodes content / pos groups only); use DAB-DETR, "
                "Deformable DETR, DINO, RT-DETR or D-FINE"
            )
        self.model = model
        self.softmax = not model.use_focal
        self.num_classes = int(model.num_classes)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        return self.model.preprocess_image(batched_inputs)

    @staticmethod
    def _box_groups(groups: Sequence[torch.Tensor]) -> List[Dict]:
        return [{"boxes": boxes, "content": None} for boxes in groups]

    def evaluate_boxes(self, images, groups, state=None):
        outputs = self.model.forward_raw(images, self._box_groups(groups))
        return _group_outputs(outputs["groups"])

    def teach(self, images, groups, num_own: int):
        outputs = self.model.forward_raw(images, self._box_groups(groups))
        layers = outputs["layers"]
        own = {
            "pred_logits": layers["pred_logits"],
            "pred_boxes": layers["pred_boxes"],
        }
        num_queries = own["pred_boxes"].shape[2]
        if 0 < num_own < num_queries:
            final = own["pred_logits"][-1].float()
            score = final.softmax(-1)[..., :-1] if self.softmax else final.sigmoid()
            keep = score.amax(-1).topk(num_own, dim=1).indices  # (B, N)
            own = {
                k: v.gather(2, keep[None, :, :, None].expand(v.shape[0], -1, -1, v.shape[-1]))
                for k, v in own.items()
            }
        own["boxes"] = own["pred_boxes"][-1].detach()
        return own, _group_outputs(outputs["groups"])

    def train_forward(self, model, batched_inputs, groups):
        loss_dict, outputs = model(batched_inputs, extra_query_groups=self._box_groups(groups))
        return loss_dict, {"groups": _group_outputs(outputs["groups"])}

    def own_proposals(self, state, num):
        return None


@BOX_EVALUATOR_REGISTRY.register(name="GeneralizedRCNN")
class RCNNBoxEvaluator:
    """Detectron2's ``GeneralizedRCNN`` with single-stage ROI heads (``StandardROIHeads`` and
    subclasses such as ``ViLDROIHeads``): boxes are the proposals of the box branch, pooled
    (``roi_heads.box_pooler`` on ``box_in_features``) -> ``box_head`` -> ``box_predictor``:
    class scores, softmax with background last (Detectron2's convention, K = C + 1), and box
    deltas applied to the boxes by the predictor's ``box2box_transform``. With class-specific
    regression the refined box is the one of the highest-scoring foreground class (chosen
    without gradient). L = 1.

    A teacher's own boxes are its RPN proposals in inference (the ``num_own`` best by
    objectness, repeated when fewer; its targets there are its ROI outputs); a student's own
    boxes are the proposals of its training forward (before ground-truth sampling).
    """

    groups_in_forward = False

    def __init__(self, model: nn.Module):
        heads = getattr(model, "roi_heads", None)
        name = type(model).__name__
        missing = [
            n for n in ("box_pooler", "box_head", "box_predictor", "box_in_features")
            if not hasattr(heads, n)
        ]  # fmt: skip
        if heads is None or missing:
            raise ValueError(
                f"{name} cannot evaluate boxes: its ROI heads "
                f"({type(heads).__name__}) lack {', '.join(missing or ['roi_heads'])}; use "
                "StandardROIHeads (Faster R-CNN)"
            )
        predictor = heads.box_predictor
        if not hasattr(predictor, "box2box_transform"):
            raise ValueError(
                f"{name} cannot evaluate boxes: its box predictor ({type(predictor).__name__}) "
                "is not a single FastRCNNOutputLayers (cascade heads are not supported)"
            )
        if getattr(model, "proposal_generator", None) is None:
            raise ValueError(f"{name} cannot evaluate boxes without a proposal generator (RPN)")
        self.model = model
        self.softmax = True
        self.num_classes = int(heads.num_classes)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        return self.model.preprocess_image(batched_inputs)

    def _roi_outputs(self, images: ImageList, features: Dict, boxes: torch.Tensor) -> Dict:
        """(B, M, 4) normalised cxcywh -> {"pred_logits" (B, M, C + 1), "pred_boxes" (B, M, 4)}."""
        heads = self.model.roi_heads
        bsz, num = boxes.shape[:2]
        scale = torch.tensor(
            [[w, h, w, h] for h, w in images.image_sizes], dtype=boxes.dtype, device=boxes.device
        )[:, None]  # (B, 1, 4)
        absolute = box_cxcywh_to_xyxy(boxes.float()) * scale
        pooled = heads.box_pooler(
            [features[f] for f in heads.box_in_features], [Boxes(b) for b in absolute]
        )
        scores, deltas = heads.box_predictor(heads.box_head(pooled))
        scores = scores[0] if isinstance(scores, (tuple, list)) else scores
        predictor = heads.box_predictor
        refined = predictor.box2box_transform.apply_deltas(deltas, absolute.reshape(-1, 4))
        per_class = refined.shape[1] // 4
        if per_class > 1:  # class-specific: the box of the best foreground class
            best = scores[:, :-1].detach().argmax(-1)
            refined = refined.view(-1, per_class, 4)[torch.arange(len(best)), best]
        refined = box_xyxy_to_cxcywh(refined.view(bsz, num, 4) / scale)
        return {"pred_logits": scores.view(bsz, num, -1), "pred_boxes": refined}

    def _evaluate(self, images, features, groups: Sequence[torch.Tensor]) -> List[Dict]:
        bsz = len(images.image_sizes)
        sets = [_as_batch(boxes, bsz) for boxes in groups]
        if not sets:
            return []
        joint = self._roi_outputs(images, features, torch.cat(sets, dim=1))  # one ROI pass
        sizes = [s.shape[1] for s in sets]
        return [
            {k: v[None] for k, v in zip(joint, parts)}
            for parts in zip(*(joint[k].split(sizes, dim=1) for k in joint))
        ]

    def evaluate_boxes(self, images, groups, state=None):
        features = self.model.backbone(images.tensor) if state is None else state["features"]
        return self._evaluate(images, features, groups)

    def _proposals(self, images, proposals, num: int) -> torch.Tensor:
        per_image = []
        for p, (h, w) in zip(proposals, images.image_sizes):
            boxes = p.proposal_boxes.tensor.detach()[:num]  # sorted by objectness
            scale = boxes.new_tensor([w, h, w, h])
            per_image.append(box_xyxy_to_cxcywh(boxes / scale))
        return fixed_count_boxes(per_image, num)

    def teach(self, images, groups, num_own: int):
        features = self.model.backbone(images.tensor)
        proposals, _ = self.model.proposal_generator(images, features, None)
        if num_own <= 0:
            num_own = max(len(p) for p in proposals)
        own_boxes = self._proposals(images, proposals, max(num_own, 1))
        outputs = self._evaluate(images, features, [own_boxes, *groups])
        own = dict(outputs[0], boxes=own_boxes)
        return own, outputs[1:]

    def train_forward(self, model, batched_inputs, groups):
        """Detectron2's training forward through ``model`` (DDP-wrapped or not); a forward hook
        on the proposal generator keeps the images, backbone features and proposals, so that
        the boxes are evaluated on the same features (gradients reach the backbone)."""
        kept = {}

        def keep(module, args, output):
            kept["images"], kept["features"] = args[0], args[1]
            kept["proposals"] = output[0]

        handle = self.model.proposal_generator.register_forward_hook(keep)
        try:
            loss_dict = model(batched_inputs)
        finally:
            handle.remove()
        return loss_dict, kept

    def own_proposals(self, state, num):
        return self._proposals(state["images"], state["proposals"], num)


def build_box_evaluator(model: nn.Module, role: str = "model"):
    """The :class:`BoxEvaluator` of ``model`` (not DDP-wrapped), from the first class of its MRO
    registered in :data:`BOX_EVALUATOR_REGISTRY`.

    Raises:
        TypeError: no adapter serves the model's meta-architecture.
        ValueError: the adapter found the model unable to evaluate boxes (the reason named).
    """
    for cls in type(model).__mro__:
        if cls.__name__ in BOX_EVALUATOR_REGISTRY:
            try:
                return BOX_EVALUATOR_REGISTRY.get(cls.__name__)(model)
            except ValueError as e:
                raise ValueError(f"The {role} {e}") from e
    raise TypeError(
        f"The {role} ({type(model).__name__}) cannot evaluate boxes: no box evaluator serves its "
        f"meta-architecture (BOX_EVALUATOR_REGISTRY has {', '.join(BOX_EVALUATOR_REGISTRY.names())}"
        "); register an adapter in kd_detr.distill.box_evaluation"
    )
