# Copyright (c) kd_detr contributors.
"""What one KD step computes for its terms: the union of their declared inputs
(:func:`kd_inputs`) and the :class:`KDContext` holding exactly that (:func:`build_kd_context`)."""
import contextlib
from typing import Dict, FrozenSet, Iterable, List

import torch

from .class_mapping import map_teacher_logits
from .context import KDContext
from .pairing import KDPairing
from .teacher import Teacher

__all__ = ["build_kd_context", "kd_inputs", "keeping_attention_maps"]


@contextlib.contextmanager
def keeping_attention_maps(models: Iterable, enabled: bool):
    """Within the block, the (unwrapped) ``models`` return their decoder attention maps
    ("attention_maps" of ``forward_raw``) when ``enabled`` (a KD term declared "attention"); the
    flag is restored afterwards, so evaluation and other passes use the fused attention."""
    if not enabled:
        yield
        return
    models = list(models)
    saved = [m.keep_attention_maps for m in models]
    for model in models:
        model.keep_attention_maps = True
    try:
        yield
    finally:
        for model, value in zip(models, saved):
            model.keep_attention_maps = value


def kd_inputs(terms: Iterable, pairing: KDPairing) -> FrozenSet[str]:
    """Everything the terms (and, when some term reads "points", the pairing) declared;
    "matching" implies "targets", "distributions" implies "points".

    Raises:
        ValueError: a term reads "distributions" and the pairing cannot pair them.
    """
    needed = set()
    for term in terms:
        needed |= set(getattr(term, "inputs", ()))
    if "distributions" in needed:
        needed.add("points")
        if "distributions" not in pairing.provides:
            readers = [
                type(t).__name__ for t in terms if "distributions" in getattr(t, "inputs", ())
            ]
            raise ValueError(
                f"{', '.join(readers)} (MODEL.KD.LOSSES) distils box distributions at paired "
                f"points, which MODEL.KD.POINTS {pairing.name!r} does not pair: use "
                "MODEL.KD.POINTS 'consistent'"
            )
    if "points" in needed:
        needed |= set(pairing.inputs)
    if "matching" in needed:
        needed.add("targets")
    return frozenset(needed)


def _final_layer(outputs: Dict) -> Dict[str, torch.Tensor]:
    return {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}


@torch.no_grad()
def _matching(matcher, outputs: Dict, targets: List[Dict]):
    return matcher({k: v.detach() for k, v in outputs.items()}, targets)


def build_kd_context(
    iteration: int,
    batched_inputs: List[Dict],
    student_outputs: Dict,
    teacher_outputs: Dict,
    inputs: FrozenSet[str],
    *,
    student,
    teacher: Teacher,
) -> KDContext:
    """The context of one batch with what ``inputs`` asks for ("points" are added by the
    pairing afterwards).

    Args:
        student: the student model (not DDP-wrapped): its ``prepare_targets`` and matcher.
        teacher (Teacher): the teacher: its matcher and class mapping.
    """
    sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
    context = KDContext(
        iteration=iteration,
        batched_inputs=batched_inputs,
        image_sizes=sizes,
        student_outputs=student_outputs,
        teacher_outputs=teacher_outputs,
        teacher_softmax=teacher.softmax,
        inputs=inputs,
    )
    if "targets" in inputs:
        context.targets = student.prepare_targets(batched_inputs, sizes)
    if "matching" in inputs:
        context.student_matching = _matching(
            student.criterion.matcher, _final_layer(student_outputs), context.targets
        )
        t_final = _final_layer(teacher_outputs)
        t_final["pred_logits"] = teacher.map_logits(t_final["pred_logits"])
        context.teacher_matching = _matching(
            teacher.model.criterion.matcher, t_final, context.targets
        )
    if "detections" in inputs:
        layers = teacher_outputs["layers"]
        keys = [k for k in ("pred_logits", "pred_boxes", "hidden_states") if k in layers]
        detections = {k: layers[k].detach() for k in keys}
        # Unmapped softmax classes fold into the background at T = 1 (these methods have no
        # temperature): softmax of the mapped logits is the teacher's class marginal.
        detections["pred_logits"] = map_teacher_logits(
            detections["pred_logits"], teacher.class_index, teacher.softmax, 1.0
        )
        context.teacher_detections = detections
    return context
