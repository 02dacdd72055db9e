# Copyright (c) kd_detr contributors.
"""``KD_PAIRING_REGISTRY``: how teacher and student predictions are paired for the point terms
(``MODEL.KD.POINTS``), one plug-in per way.

A pairing takes part in three moments of the KD step (the trainer only orchestrates):

1. :meth:`KDPairing.teacher_groups` ``(iteration) -> groups``: extra query groups the teacher
   decodes (KD-DETR: the general points).
2. :meth:`KDPairing.student_groups` ``(teacher_outputs, teacher_groups, batch_size) -> groups``:
   extra query groups the student decodes in its (DDP-wrapped) training forward.
3. :meth:`KDPairing.pairs` ``(context) -> list[PointPair]``: the paired point groups, from both
   models' outputs in the :class:`~kd_detr.distill.context.KDContext`.

``inputs`` declares what the pairing reads from the context besides the outputs (the
similar-* baselines need the ground truth); ``box_groups`` whether both models must decode box
groups (checked at start-up); ``provides`` the optional pair contents it can add when a term
asks for them (``KD_INPUTS`` entries: "distributions", the models' box distributions, checked
at start-up by :func:`~kd_detr.distill.step.kd_inputs`).
"""
from typing import Dict, FrozenSet, List, Optional

from ..utils import NamedRegistry
from .baselines import inconsistent_pairs, similar_foreground_pairs, similar_general_pairs
from .context import KDContext, PointPair
from .interface import check_distillable
from .points import DistillationPointSampler, specific_points
from .teacher import Teacher
from .weights import foreground_weights

__all__ = [
    "ConsistentPairing",
    "InconsistentPairing",
    "KDPairing",
    "KD_PAIRING_REGISTRY",
    "SimilarForegroundPairing",
    "SimilarGeneralPairing",
    "build_pairing",
]

KD_PAIRING_REGISTRY = NamedRegistry("KD_PAIRING")
KD_PAIRING_REGISTRY.__doc__ = """
Pairings of teacher and student predictions for the point KD terms, selected by
``MODEL.KD.POINTS``: ``consistent`` (KD-DETR), and the paper's baselines ``inconsistent``,
``similar_foreground``, ``similar_general``. Each entry is a :class:`KDPairing` subclass built as
``cls(cfg, student=..., teacher=...)`` (see :func:`build_pairing`).
"""


class KDPairing:
    """Base class: no extra groups; subclasses implement :meth:`pairs`.

    Args:
        student: the student model (not DDP-wrapped).
        teacher (Teacher): the frozen teacher.
        point_weights (bool): weight points by the teacher's foreground probability.
    """

    name = ""
    inputs: FrozenSet[str] = frozenset()
    provides: FrozenSet[str] = frozenset()
    box_groups: bool = False

    def __init__(self, *, student, teacher: Teacher, point_weights: bool = True):
        check_distillable(student, "student", box_groups=self.box_groups, what=self.what())
        check_distillable(teacher.model, "teacher", box_groups=self.box_groups, what=self.what())
        self.student = student
        self.teacher = teacher
        self.point_weights = point_weights

    @classmethod
    def what(cls) -> str:
        return f"MODEL.KD.POINTS {cls.name}"

    def teacher_groups(self, iteration: int) -> List[Dict]:
        return []

    def student_groups(self, teacher_outputs: Dict, teacher_groups, batch_size: int) -> List[Dict]:
        return []

    def pairs(self, context: KDContext) -> List[PointPair]:
        raise NotImplementedError

    def state_dict(self) -> Dict:
        """Checkpointed state (e.g. the general point sampler's settings)."""
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


@KD_PAIRING_REGISTRY.register(name="consistent")
class ConsistentPairing(KDPairing):
    """KD-DETR: both models decode the same points, the teacher's detection queries (specific
    points, ``MODEL.KD.SPECIFIC``) and random boxes (general points, ``MODEL.KD.GENERAL``).

    Args:
        sampler (DistillationPointSampler or None): general points; None: no general group.
        specific (bool): distil at the teacher's own queries.
    """

    name = "consistent"
    box_groups = True
    provides = frozenset({"distributions"})

    def __init__(
        self,
        *,
        student,
        teacher: Teacher,
        sampler: Optional[DistillationPointSampler] = None,
        specific: bool = True,
        point_weights: bool = True,
    ):
        if sampler is None and not specific:
            raise ValueError("KD-DETR needs general and/or specific points (MODEL.KD.*)")
        super().__init__(student=student, teacher=teacher, point_weights=point_weights)
        self.sampler = sampler
        self.specific = specific

    @classmethod
    def from_config(cls, cfg, *, student, teacher: Teacher) -> "ConsistentPairing":
        kd = cfg.MODEL.KD
        return cls(
            student=student,
            teacher=teacher,
            sampler=DistillationPointSampler(cfg) if kd.GENERAL.ENABLED else None,
            specific=kd.SPECIFIC.ENABLED,
            point_weights=kd.FOREGROUND_WEIGHTS,
        )

    def teacher_groups(self, iteration: int) -> List[Dict]:
        """The general points: one (1, Mg, 4) set for every image, rank and model."""
        if self.sampler is None:
            return []
        return [self.sampler.group(iteration, device=self.teacher.device)]

    def student_groups(self, teacher_outputs: Dict, teacher_groups, batch_size: int) -> List[Dict]:
        """The specific points (the teacher's detection queries), then the general points."""
        groups = []
        if self.specific:
            content = self.teacher.query_content(batch_size, teacher_outputs)
            groups.append(specific_points(teacher_outputs, self.student.hidden_dim, content))
        return groups + list(teacher_groups)

    def pairs(self, context: KDContext) -> List[PointPair]:
        t_out, s_out = context.teacher_outputs, context.student_outputs
        names, targets = [], []
        if self.specific:
            names.append("specific")
            targets.append(t_out["layers"])
        if self.sampler is not None:
            names.append("general")
            targets.append(t_out["groups"][0])
        distributions = "distributions" in context.inputs
        pairs = []
        for name, s_group, t_group in zip(names, s_out["groups"], targets):
            target, weights = self.teacher.targets(t_group, self.point_weights, distributions)
            if distributions:  # the student's "pred_corners" / "initial_boxes" are in s_group
                s_group = dict(s_group, corner_offsets=self.student.corner_offsets())
            pairs.append(PointPair(name, s_group, target, weights))
        return pairs

    def state_dict(self) -> Dict:
        return {} if self.sampler is None else {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])


class _DetectionQueryPairing(KDPairing):
    """The paper's baselines: pair the two models' own detection-query predictions."""

    @classmethod
    def from_config(cls, cfg, *, student, teacher: Teacher) -> "KDPairing":
        return cls(student=student, teacher=teacher, point_weights=cfg.MODEL.KD.FOREGROUND_WEIGHTS)

    def pairs(self, context: KDContext) -> List[PointPair]:
        keys = ("pred_logits", "pred_boxes")
        student = {k: context.student_outputs["layers"][k] for k in keys}
        teacher = {k: context.teacher_outputs["layers"][k][-1] for k in keys}
        teacher["pred_logits"] = self.teacher.map_logits(teacher["pred_logits"])
        s_pair, t_pair = self.pair(student, teacher, context)
        weights = None
        if self.point_weights:  # paired logits are already in the student's class space
            weights = foreground_weights(t_pair["pred_logits"], self.teacher.softmax)
        return [PointPair(self.name, s_pair, t_pair, weights)]

    def pair(self, student: Dict, teacher: Dict, context: KDContext):
        raise NotImplementedError

    def _matchers(self):
        return self.student.criterion.matcher, self.teacher.model.criterion.matcher


@KD_PAIRING_REGISTRY.register(name="inconsistent")
class InconsistentPairing(_DetectionQueryPairing):
    """Detection queries paired by index (:func:`inconsistent_pairs`)."""

    name = "inconsistent"

    def pair(self, student, teacher, context):
        return inconsistent_pairs(student, teacher)


@KD_PAIRING_REGISTRY.register(name="similar_foreground")
class SimilarForegroundPairing(_DetectionQueryPairing):
    """Predictions matched to the same ground-truth object (:func:`similar_foreground_pairs`)."""

    name = "similar_foreground"
    inputs = frozenset({"targets"})

    def pair(self, student, teacher, context):
        return similar_foreground_pairs(student, teacher, context.targets, *self._matchers())


@KD_PAIRING_REGISTRY.register(name="similar_general")
class SimilarGeneralPairing(_DetectionQueryPairing):
    """:class:`SimilarForegroundPairing` plus one background pair per image
    (:func:`similar_general_pairs`)."""

    name = "similar_general"
    inputs = frozenset({"targets"})

    def pair(self, student, teacher, context):
        return similar_general_pairs(student, teacher, context.targets, *self._matchers())


def build_pairing(cfg, *, student, teacher: Teacher) -> KDPairing:
    """The ``MODEL.KD.POINTS`` pairing of a KD config.

    Raises:
        ValueError: for an unknown ``MODEL.KD.POINTS`` (listing the registered ones) or a model
            that cannot decode what the pairing needs (naming the model).
    """
    name = cfg.MODEL.KD.POINTS
    if name not in KD_PAIRING_REGISTRY:
        raise ValueError(
            f"MODEL.KD.POINTS must be one of {tuple(KD_PAIRING_REGISTRY.names())}, got {name!r}"
        )
    return KD_PAIRING_REGISTRY.get(name).from_config(cfg, student=student, teacher=teacher)
