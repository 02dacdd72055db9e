# Copyright (c) kd_detr contributors.
"""Teacher -> student class correspondence for KD between models with different class lists
(e.g. a COCO teacher for a student trained on a subset of COCO's classes), and the conversion
between classifier types (sigmoid / focal C logits vs softmax C + 1 logits with background last)
for distillation across architectures (DETR <-> Faster R-CNN).

Teacher and student must have identical class lists, or ``MODEL.KD.CLASS_MAPPING`` maps them by
name; anything else raises a ValueError that names the unmatched classes and the fix.
"""
import difflib
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "BACKGROUND_RULES",
    "build_class_mapping",
    "convert_class_logits",
    "map_teacher_logits",
    "sigmoid_to_softmax_logits",
    "softmax_to_sigmoid_logits",
]

_KEY = "MODEL.KD.CLASS_MAPPING"


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    lowered = [c for c in candidates if c.lower() == name.lower()]
    best = lowered or close
    return f"{name!r} (closest teacher class: {best[0]!r})" if best else repr(name)


def _names(names: Sequence[str], teacher: Sequence[str]) -> str:
    return ", ".join(_suggest(n, teacher) for n in names)


def _listed(names: Sequence[str], limit: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"


def _parse(entries: Sequence[str], student: Sequence[str], teacher: Sequence[str]):
    """(explicit {student: teacher}, by_name flag) from CLASS_MAPPING entries."""
    explicit, by_name = {}, False
    for entry in entries:
        entry = str(entry).strip()
        if entry == "*":
            by_name = True
            continue
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"{_KEY}: malformed entry {entry!r}; expected 'student_class:teacher_class' or '*'"
            )
        s_name, t_name = parts
        if s_name not in student:
            raise ValueError(f"{_KEY}: {entry!r} names unknown student class {s_name!r}")
        if t_name not in teacher:
            raise ValueError(
                f"{_KEY}: {entry!r} names unknown teacher class {_suggest(t_name, teacher)}"
            )
        if s_name in explicit:
            raise ValueError(f"{_KEY}: student class {s_name!r} is mapped twice")
        explicit[s_name] = t_name
    return explicit, by_name


def build_class_mapping(
    student_classes: Sequence[str],
    teacher_classes: Sequence[str],
    entries: Sequence[str] = (),
) -> Optional[List[int]]:
    """Teacher class index of every student class.

    Args:
        student_classes (Sequence[str]): the student's C_s class names, in logit order.
        teacher_classes (Sequence[str]): the teacher's C_t class names, in logit order.
        entries (Sequence[str]): ``MODEL.KD.CLASS_MAPPING``: "student:teacher" pairs and/or "*"
            (every student class without a pair maps to the teacher class of the same name).
            Empty: the lists must be identical.

    Returns:
        list[int] or None: ``index[s]`` = teacher class of student class s (each teacher class
        used at most once); None when no mapping is needed (identical lists, no entries).

    Raises:
        ValueError: naming the unmatched classes, the class counts and the fix.
    """
    student, teacher = list(student_classes), list(teacher_classes)
    for role, names in (("student", student), ("teacher", teacher)):
        if not names:
            raise ValueError(f"KD class mapping: the {role} has no class names")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"KD class mapping: duplicate {role} class names {dup}")
    counts = f"student has {len(student)} classes, teacher has {len(teacher)}"
    if not entries:
        if student == teacher:
            return None
        missing = [s for s in student if s not in teacher]
        if missing:
            detail = "student classes not in the teacher: " + _names(missing, teacher)
        elif set(student) == set(teacher):
            detail = "same classes in a different order"
        else:
            detail = f"the teacher has {len(set(teacher) - set(student))} extra classes"
        raise ValueError(
            f"Teacher and student classes differ ({counts}; {detail}). Student classes: "
            f"{_listed(student)}; teacher classes: {_listed(teacher)}. Set {_KEY}, e.g. "
            "['*'] to map every student class to the teacher class of the same name, plus "
            "'student_name:teacher_name' entries for classes named differently."
        )
    explicit, by_name = _parse(entries, student, teacher)
    index, unmatched = [], []
    for s_name in student:
        t_name = explicit.get(s_name, s_name if by_name else None)
        if t_name is None or t_name not in teacher:
            unmatched.append(s_name)
        else:
            index.append(teacher.index(t_name))
    if unmatched:
        hint = "" if by_name else " or add '*' to match the others by identical name"
        raise ValueError(
            f"{_KEY} leaves {len(unmatched)} of the student's classes without a teacher class "
            f"({counts}): {_names(unmatched, teacher)}. Add "
            f"'student_name:teacher_name' entries for them{hint}."
        )
    used = [teacher[i] for i in index]
    shared = sorted({t for t in used if used.count(t) > 1})
    if shared:
        raise ValueError(
            f"{_KEY}: teacher classes {shared} are mapped to several student classes; each "
            "teacher class can serve one student class"
        )
    return index


def map_teacher_logits(
    logits: torch.Tensor,
    index: Optional[Sequence[int]],
    softmax: bool,
    temperature: float = 1.0,
    fold_unmapped: bool = True,
) -> torch.Tensor:
    """Teacher logits in the student's class space.

    Sigmoid teachers: the mapped columns, (..., C_s). Softmax teachers: the mapped columns and
    a background logit last, (..., C_s + 1). With ``fold_unmapped`` the background logit is
    ``T * logsumexp(z_j / T)`` over the teacher's background and unmapped classes, so that
    ``softmax(mapped / T)`` is exactly the teacher's class marginal at temperature T (pass the
    KD temperature); otherwise it is the teacher's background logit (the unmapped classes'
    probability is renormalised over the kept ones).

    Args:
        logits (Tensor): (..., C_t) sigmoid or (..., C_t + 1) softmax teacher logits.
        index (Sequence[int] or None): from :func:`build_class_mapping`; None: unchanged.
        softmax (bool): the teacher has a background logit (last).
        temperature (float): T of the fold.
        fold_unmapped (bool): fold the unmapped classes into the background (softmax only).

    Returns:
        Tensor: mapped logits (same dtype and device).
    """
    if index is None:
        return logits
    idx = torch.as_tensor(index, dtype=torch.int64, device=logits.device)
    mapped = logits.index_select(-1, idx)
    if not softmax:
        return mapped
    if not fold_unmapped:
        return torch.cat([mapped, logits[..., -1:]], dim=-1)
    rest = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    rest[idx] = False  # unmapped classes and the background (never in index)
    background = temperature * torch.logsumexp(logits[..., rest] / temperature, -1, keepdim=True)
    return torch.cat([mapped, background], dim=-1)


BACKGROUND_RULES = ("product", "max")
_LOG_EPS = 1e-12


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's rule)."""
    x = x.clamp(max=-_LOG_EPS)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-x.exp()))


def sigmoid_to_softmax_logits(logits: torch.Tensor, background: str = "product") -> torch.Tensor:
    """Sigmoid (focal) class logits -> log-probabilities of a softmax classifier with background.

    With p_c = sigmoid(z_c) for the C classes and a background probability b (``"product"``:
    b = prod_c (1 - p_c), the probability that no class fires if the C binary decisions are
    independent; ``"max"``: b = 1 - max_c p_c), the softmax target is
    q = [p_1, ..., p_C, b] / (sum_c p_c + b), returned as log q, so ``softmax(log q) = q``.

    Args:
        logits (Tensor): (..., C) sigmoid logits.
        background (str): one of :data:`BACKGROUND_RULES`.

    Returns:
        Tensor: (..., C + 1) logits, background last, float32 or wider.
    """
    if background not in BACKGROUND_RULES:
        raise ValueError(
            f"unknown background rule {background!r}; expected one of {BACKGROUND_RULES} "
            "(MODEL.KD.BOXES.BACKGROUND)"
        )
    z = logits if logits.dtype == torch.float64 else logits.float()
    log_p = F.logsigmoid(z)
    if background == "product":
        log_b = F.logsigmoid(-z).sum(-1, keepdim=True)
    else:
        log_b = F.logsigmoid(-z.amax(-1, keepdim=True))
    joint = torch.cat([log_p, log_b], dim=-1)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def softmax_to_sigmoid_logits(logits: torch.Tensor) -> torch.Tensor:
    """Softmax class logits with background (last) -> per-class sigmoid logits.

    Each class keeps its softmax probability p_c = softmax(z)_c (background included in the
    normalisation) as an independent binary probability: the result is logit(p_c) =
    log p_c - log(1 - p_c), so ``sigmoid(result) = p_c``.

    Args:
        logits (Tensor): (..., C + 1) softmax logits, background last.

    Returns:
        Tensor: (..., C) sigmoid logits, float32 or wider.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    log_p = F.log_softmax(z, dim=-1)[..., :-1]
    return log_p - _log1mexp(log_p)


def convert_class_logits(
    logits: torch.Tensor, teacher_softmax: bool, student_softmax: bool, background: str = "product"
) -> torch.Tensor:
    """Teacher logits (already in the student's classes) in the student's classifier type:
    unchanged when both agree, else :func:`sigmoid_to_softmax_logits` or
    :func:`softmax_to_sigmoid_logits`.

    Args:
        logits (Tensor): (..., C) sigmoid or (..., C + 1) softmax teacher logits.
        teacher_softmax, student_softmax (bool): each model's classifier type.
        background (str): the sigmoid -> softmax background rule.
    """
    if teacher_softmax == student_softmax:
        return logits
    if student_softmax:
        return sigmoid_to_softmax_logits(logits, background)
    return softmax_to_sigmoid_logits(logits)
