# Copyright (c) kd_detr contributors.
"""``MODEL.KD.POINTS "boxes"``: KD-DETR's consistent points across architectures (any teacher,
any student), through the box-evaluation interface (:mod:`.box_evaluation`).

Distillation points are boxes that both models evaluate (:class:`BoxEvaluator`):

* general points: the random boxes of :class:`~kd_detr.distill.points.DistillationPointSampler`
  (``MODEL.KD.GENERAL``);
* specific points (``MODEL.KD.SPECIFIC.ENABLED``): the teacher's own boxes: a DETR teacher's
  final predicted boxes of its detection queries, a Faster R-CNN teacher's RPN proposals, at
  most ``MODEL.KD.BOXES.NUM_TEACHER_BOXES`` per image; the teacher's targets there are its own
  outputs at those boxes;
* optionally (``MODEL.KD.BOXES.STUDENT_PROPOSALS``), a student's own proposals (R-CNN students).

The teacher's targets are mapped to the student's classes (``MODEL.KD.CLASS_MAPPING``) and then
to the student's classifier type (:func:`~kd_detr.distill.class_mapping.convert_class_logits`,
background rule ``MODEL.KD.BOXES.BACKGROUND``); for a sigmoid student they can be made targets a
set predictor follows (:mod:`.set_targets`: a floor on the class probabilities, the teacher's
class-wise NMS over each group's points); foreground weights come from the teacher's own
logits. The point terms (``KDDETRLoss``, DKD, ...) then apply unchanged, on top of the
student's own detection losses.

Unlike the other pairings, this one runs the models itself (:meth:`BoxEvaluationPairing.run`):
a DETR student decodes the points in its training forward, so the teacher runs first; an R-CNN
student evaluates them after its training forward on the same backbone features, so the teacher
runs second (and can evaluate the student's proposals).
"""
import logging
from typing import Dict, List, Tuple

import torch

from detectron2.config import CfgNode as CN

from ..config import CONFIG_EXTENSION_REGISTRY
from .box_evaluation import build_box_evaluator
from .class_mapping import BACKGROUND_RULES, convert_class_logits
from .context import KDContext, PointPair
from .pairing import KD_PAIRING_REGISTRY, KDPairing
from .points import DistillationPointSampler
from .set_targets import (
    NMS_RANKS,
    floor_class_probabilities,
    probability_logit,
    suppress_duplicate_targets,
)
from .teacher import Teacher

__all__ = ["BoxEvaluationPairing", "add_box_kd_config"]

logger = logging.getLogger(__name__)


@CONFIG_EXTENSION_REGISTRY.register(name="distill_boxes")
def add_box_kd_config(cfg):
    """Add ``MODEL.KD.BOXES.*``, the settings of ``MODEL.KD.POINTS "boxes"`` (in place)."""
    boxes = cfg.MODEL.KD.BOXES = CN()
    # Specific points per image: at most this many of the teacher's own boxes (a DETR teacher's
    # highest-scoring detection queries, a Faster R-CNN teacher's best RPN proposals); 0: all.
    boxes.NUM_TEACHER_BOXES = 100
    # Also distil at the student's own proposals of its training forward (R-CNN students only),
    # NUM_STUDENT_PROPOSALS per image (best objectness first).
    boxes.STUDENT_PROPOSALS = False
    boxes.NUM_STUDENT_PROPOSALS = 100
    # Sigmoid (focal) teacher -> softmax student: the background probability of the softmax
    # target, "product" (prod_c (1 - p_c)) or "max" (1 - max_c p_c); see
    # kd_detr.distill.class_mapping.sigmoid_to_softmax_logits.
    boxes.BACKGROUND = "product"
    # Sigmoid (focal) students: every class target probability raised to at least this
    # (e.g. 0.01, a focal student's prior at initialisation); 0: off. See
    # kd_detr.distill.set_targets.
    boxes.MIN_CLASS_PROBABILITY = 0.0
    # Sigmoid students: the teacher's class-wise NMS over the points of each group and image at
    # this IoU; each suppressed (point, class) target becomes MIN_CLASS_PROBABILITY (> 0
    # needed). 0: off. 0.5 is a Faster R-CNN's MODEL.ROI_HEADS.NMS_THRESH_TEST.
    boxes.CLASS_NMS_THRESH = 0.0
    # What the class-wise NMS ranks by: "probability" (the teacher's, as its own NMS) or
    # "probability_x_fit" (times the IoU of the point's box with the teacher's box there).
    boxes.CLASS_NMS_RANK = "probability"


@KD_PAIRING_REGISTRY.register(name="boxes")
class BoxEvaluationPairing(KDPairing):
    """KD-DETR's points as boxes evaluated by both models, whatever their meta-architectures.

    Args:
        student: the student model (not DDP-wrapped).
        teacher (Teacher): the frozen teacher.
        sampler (DistillationPointSampler or None): general points; None: none.
        specific (bool): distil at the teacher's own boxes.
        point_weights (bool): foreground weights from the teacher's logits.
        num_teacher_boxes (int): specific points per image (0: all).
        student_proposals (bool): also distil at the student's own proposals.
        num_student_proposals (int): those per image.
        background (str): sigmoid -> softmax background rule.
        min_class_probability (float): floor of the class targets (sigmoid students); 0: off.
        class_nms_thresh (float): IoU of the class-wise NMS over each group's targets (sigmoid
            students; needs ``min_class_probability`` > 0); 0: off.
        class_nms_rank (str): one of :data:`~kd_detr.distill.set_targets.NMS_RANKS`.

    Raises:
        TypeError / ValueError: at construction, naming both meta-architectures, when a model
            cannot evaluate boxes or the classes cannot be reconciled.
    """

    name = "boxes"
    runs_models = True

    def __init__(
        self,
        *,
        student,
        teacher: Teacher,
        sampler=None,
        specific: bool = True,
        point_weights: bool = True,
        num_teacher_boxes: int = 100,
        student_proposals: bool = False,
        num_student_proposals: int = 100,
        background: str = "product",
        min_class_probability: float = 0.0,
        class_nms_thresh: float = 0.0,
        class_nms_rank: str = "probability",
    ):
        pair = f"{type(teacher.model).__name__} teacher -> {type(student).__name__} student"
        if sampler is None and not specific and not student_proposals:
            raise ValueError(f"{pair}: MODEL.KD.POINTS 'boxes' needs at least one kind of point")
        if background not in BACKGROUND_RULES:
            raise ValueError(
                f"MODEL.KD.BOXES.BACKGROUND must be one of {BACKGROUND_RULES}, got {background!r}"
            )
        try:
            self.student_eval = build_box_evaluator(student, "student")
            self.teacher_eval = build_box_evaluator(teacher.model, "teacher")
        except (TypeError, ValueError) as e:
            raise type(e)(f"Cannot distil at boxes ({pair}, MODEL.KD.POINTS 'boxes'): {e}") from e
        t_classes = self.teacher_eval.num_classes
        if teacher.class_index is not None:
            t_classes = len(teacher.class_index)
        if t_classes != self.student_eval.num_classes:
            raise ValueError(
                f"Cannot reconcile the classes of the {pair}: the teacher gives "
                f"{t_classes} classes (after MODEL.KD.CLASS_MAPPING), the student has "
                f"{self.student_eval.num_classes}; set MODEL.KD.CLASS_MAPPING"
            )
        if student_proposals and self.student_eval.groups_in_forward:
            raise ValueError(
                f"{pair}: MODEL.KD.BOXES.STUDENT_PROPOSALS needs a student with proposals "
                f"(an R-CNN); {type(student).__name__} has none"
            )
        self._check_set_targets(pair, min_class_probability, class_nms_thresh, class_nms_rank)
        self.class_nms_rank = class_nms_rank
        self.min_class_probability = float(min_class_probability)
        self.class_nms_thresh = float(class_nms_thresh)
        self.student = student
        self.teacher = teacher
        self.point_weights = point_weights
        self.sampler = sampler
        self.specific = specific
        self.num_teacher_boxes = int(num_teacher_boxes)
        self.student_proposals = student_proposals
        self.num_student_proposals = int(num_student_proposals)
        self.background = background
        logger.info(
            f"Box-evaluation KD, {pair}: teacher {'softmax' if teacher.softmax else 'sigmoid'} "
            f"-> student {'softmax' if self.student_eval.softmax else 'sigmoid'} classes"
        )

    @classmethod
    def from_config(cls, cfg, *, student, teacher: Teacher) -> "BoxEvaluationPairing":
        kd = cfg.MODEL.KD
        pairing = cls(
            student=student,
            teacher=teacher,
            sampler=DistillationPointSampler(cfg) if kd.GENERAL.ENABLED else None,
            specific=kd.SPECIFIC.ENABLED,
            point_weights=kd.FOREGROUND_WEIGHTS,
            num_teacher_boxes=kd.BOXES.NUM_TEACHER_BOXES,
            student_proposals=kd.BOXES.STUDENT_PROPOSALS,
            num_student_proposals=kd.BOXES.NUM_STUDENT_PROPOSALS,
            background=kd.BOXES.BACKGROUND,
            min_class_probability=kd.BOXES.MIN_CLASS_PROBABILITY,
            class_nms_thresh=kd.BOXES.CLASS_NMS_THRESH,
            class_nms_rank=kd.BOXES.CLASS_NMS_RANK,
        )
        if kd.MODE == "sigmoid" and pairing.student_eval.softmax:
            raise ValueError(
                f"MODEL.KD.MODE 'sigmoid' needs a sigmoid (focal) student, but the student "
                f"({type(student).__name__}) has softmax classes: use 'normalized'"
            )
        return pairing

    def _check_set_targets(
        self, pair: str, min_probability: float, nms_thresh: float, nms_rank: str
    ) -> None:
        """Start-up checks of MODEL.KD.BOXES.{MIN_CLASS_PROBABILITY, CLASS_NMS_THRESH,
        CLASS_NMS_RANK}."""
        if nms_rank not in NMS_RANKS:
            raise ValueError(
                f"MODEL.KD.BOXES.CLASS_NMS_RANK must be one of {NMS_RANKS}, got {nms_rank!r}"
            )
        if min_probability == 0 and nms_thresh == 0:
            return
        if self.student_eval.softmax:
            raise ValueError(
                f"{pair}: MODEL.KD.BOXES.MIN_CLASS_PROBABILITY and CLASS_NMS_THRESH shape the "
                "targets of a sigmoid (focal) student; this student has softmax classes: set "
                "both to 0"
            )
        if min_probability != 0:
            try:
                probability_logit(min_probability)
            except ValueError as e:
                raise ValueError(f"MODEL.KD.BOXES.MIN_CLASS_PROBABILITY: {e}") from e
        if nms_thresh != 0:
            if not 0 < nms_thresh < 1:
                raise ValueError(
                    f"MODEL.KD.BOXES.CLASS_NMS_THRESH must be in (0, 1) (0: off), got {nms_thresh}"
                )
            if min_probability == 0:
                raise ValueError(
                    "MODEL.KD.BOXES.CLASS_NMS_THRESH sets suppressed targets to "
                    "MODEL.KD.BOXES.MIN_CLASS_PROBABILITY, which is 0: set it (e.g. 0.01, the "
                    "focal prior)"
                )

    def _set_targets(self, target: Dict, point_boxes: torch.Tensor) -> torch.Tensor:
        """The class target logits with the floor and the class-wise NMS applied.

        Args:
            target (dict): the teacher's "pred_logits" (B, M, C) sigmoid, "pred_boxes" (B, M, 4).
            point_boxes (Tensor): (B or 1, M, 4) the group's points, normalised cxcywh.
        """
        logits = target["pred_logits"]
        if self.class_nms_thresh > 0:
            floor = self.min_class_probability  # pairs at or below it end at the floor anyway
            fit = self.class_nms_rank == "probability_x_fit"
            logits = suppress_duplicate_targets(
                logits, target["pred_boxes"], self.class_nms_thresh, floor, score_threshold=floor,
                point_boxes=point_boxes.to(logits.device) if fit else None,
            )  # fmt: skip
        return floor_class_probabilities(logits, self.min_class_probability)

    def _general(self) -> List[str]:
        return ["general"] if self.sampler is not None else []

    @torch.no_grad()
    def _teach(self, data: List[Dict], groups: List[torch.Tensor]):
        if self.teacher.model.training:
            self.teacher.freeze()
        images = self.teacher.preprocess_image(data)
        return self.teacher_eval.teach(images, groups, self.num_teacher_boxes)

    def run(self, model, data: List[Dict], iteration: int) -> Tuple[Dict, KDContext]:
        """Both models on one batch: the student's detection losses and the KD context with the
        paired point groups.

        Args:
            model: the student as trained (possibly DDP-wrapped).
            data (list[dict]): the batch.
            iteration (int): seeds the general points.
        """
        general = []
        if self.sampler is not None:
            general.append(self.sampler.sample(iteration, device=self.teacher.device))
        names = (["specific"] if self.specific else []) + self._general()
        if self.student_eval.groups_in_forward:  # DETR: the points go into the forward
            own, t_groups = self._teach(data, general)
            boxes = ([own["boxes"]] if self.specific else []) + general
            loss_dict, state = self.student_eval.train_forward(model, data, boxes)
            s_groups = state["groups"]
        else:  # R-CNN: evaluate the points on the features of the training forward
            loss_dict, state = self.student_eval.train_forward(model, data, [])
            if self.student_proposals:
                proposals = self.student_eval.own_proposals(state, self.num_student_proposals)
                general = general + [proposals.to(self.teacher.device)]
                names.append("proposals")
            own, t_groups = self._teach(data, general)
            boxes = ([own["boxes"]] if self.specific else []) + general
            boxes = [b.to(self.student.device) for b in boxes]
            s_groups = self.student_eval.evaluate_boxes(state["images"], boxes, state)
        t_groups = ([own] if self.specific else []) + list(t_groups)
        context = KDContext(
            iteration=iteration,
            batched_inputs=data,
            image_sizes=[tuple(x["image"].shape[-2:]) for x in data],
            student_outputs={"groups": s_groups},
            teacher_outputs={"own": own, "groups": t_groups},
            teacher_softmax=self.teacher.softmax,
        )
        context.pairs = self._pairs(names, s_groups, t_groups, boxes)
        return loss_dict, context

    def _pairs(self, names, s_groups, t_groups, boxes) -> List[PointPair]:
        pairs = []
        for name, s_group, t_group, points in zip(names, s_groups, t_groups, boxes):
            target, weights = self.teacher.targets(t_group, self.point_weights)
            target["pred_logits"] = convert_class_logits(
                target["pred_logits"], self.teacher.softmax, self.student_eval.softmax,
                self.background,
            )  # fmt: skip
            target["pred_logits"] = self._set_targets(target, points)
            device = s_group["pred_logits"].device
            target = {k: v.to(device) for k, v in target.items()}
            if weights is not None:
                weights = weights.to(device)
            pairs.append(PointPair(name, s_group, target, weights))
        return pairs

    def pairs(self, context: KDContext) -> List[PointPair]:
        return context.pairs

    def state_dict(self) -> Dict:
        return {} if self.sampler is None else {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
