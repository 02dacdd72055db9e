# Copyright (c) kd_detr contributors.
"""Self-distillation with an exponential-moving-average (EMA) teacher (``MODEL.KD.TEACHER.EMA``).

The teacher is a copy of the student whose parameters follow the student's after every optimizer
step, ``teacher = m * teacher + (1 - m) * student``, and whose buffers are copied (the "mean
teacher" of Tarvainen & Valpola, also the teacher of Unbiased / De-biased Teacher and the online
EMA teacher of OD-DETR). It is distilled with the KD terms of ``MODEL.KD.LOSSES`` at KD-DETR's
consistent points, like an external teacher.

Schedule (the burn-in of Unbiased Teacher): before ``START_ITER`` the EMA only tracks the student
(momentum 0, a copy after every step) and no KD loss is computed; from ``START_ITER`` on, the
update uses ``MOMENTUM`` and the KD losses are added. At iteration ``START_ITER`` the teacher is
therefore the student of the step before.

The teacher holds its own copy (not an attribute of the student): it is outside the optimizer,
the DDP wrapper and the student's ``state_dict``, in eval mode with ``requires_grad`` off. Unlike
a frozen teacher its weights are training state, checkpointed as "kd_ema_teacher", so ``--resume``
continues the average exactly.
"""
import copy
import logging
from typing import Dict

import torch
from torch import nn

from detectron2.config import CfgNode as CN

from ..config import CONFIG_EXTENSION_REGISTRY
from .teacher import Teacher

__all__ = ["EMATeacher", "add_ema_config", "check_ema_config", "ema_enabled", "ema_update_"]

logger = logging.getLogger(__name__)


@CONFIG_EXTENSION_REGISTRY.register(name="distill_ema")
def add_ema_config(cfg):
    """Add ``MODEL.KD.TEACHER.EMA.*`` (in place; after ``add_kd_config``)."""
    ema = cfg.MODEL.KD.TEACHER.EMA = CN()
    # Self-distillation: the teacher is an exponential moving average of the student, created from
    # it at the start and updated after every optimizer step; MODEL.KD.TEACHER.CONFIG_FILE and
    # WEIGHTS must then be empty (no external teacher). Needs MODEL.KD.ENABLED True.
    ema.ENABLED = False
    # m in teacher = m * teacher + (1 - m) * student, in [0, 1) (parameters; buffers are copied).
    ema.MOMENTUM = 0.999
    # Burn-in: before this iteration the EMA copies the student (momentum 0) and no KD loss is
    # applied; from it on the update uses MOMENTUM and the KD losses are added.
    ema.START_ITER = 0


def ema_enabled(cfg) -> bool:
    return bool(cfg.MODEL.KD.TEACHER.EMA.ENABLED)


def check_ema_config(cfg) -> None:
    """Stop an EMA config that also names an external teacher or other contradictions.

    Raises:
        ValueError: naming the key and the fix.
    """
    kd = cfg.MODEL.KD
    ema = kd.TEACHER.EMA
    if not ema.ENABLED:
        return
    fix = "remove them (the EMA teacher is built from the student) or set it False"
    if not kd.ENABLED:
        raise ValueError(
            "MODEL.KD.TEACHER.EMA.ENABLED needs MODEL.KD.ENABLED True (the KD trainer runs the "
            "EMA teacher)."
        )
    external = [
        f"MODEL.KD.TEACHER.{key} {value!r}"
        for key, value in (("CONFIG_FILE", kd.TEACHER.CONFIG_FILE),
                           ("WEIGHTS", kd.TEACHER.WEIGHTS), ("OPTS", list(kd.TEACHER.OPTS)))
        if value
    ]  # fmt: skip
    if external:
        raise ValueError(
            f"MODEL.KD.TEACHER.EMA.ENABLED is True but an external teacher is configured too "
            f"({', '.join(external)}): {fix} (MODEL.KD.TEACHER.EMA.ENABLED False)."
        )
    if not 0.0 <= ema.MOMENTUM < 1.0:
        raise ValueError(
            f"MODEL.KD.TEACHER.EMA.MOMENTUM must be in [0, 1), got {ema.MOMENTUM} (e.g. 0.999)."
        )
    if ema.START_ITER < 0:
        raise ValueError(f"MODEL.KD.TEACHER.EMA.START_ITER must be >= 0, got {ema.START_ITER}.")
    others = {
        "MODEL.KD.CLASS_MAPPING": list(kd.CLASS_MAPPING),
        "MODEL.KD.INIT_STUDENT_FROM_TEACHER": kd.INIT_STUDENT_FROM_TEACHER,
    }
    for key, value in others.items():
        if value:
            raise ValueError(
                f"{key} {value!r} makes no sense with MODEL.KD.TEACHER.EMA.ENABLED (teacher and "
                f"student are the same model): remove it."
            )
    if kd.POINTS == "boxes":
        raise ValueError(
            "MODEL.KD.POINTS 'boxes' is for teachers of another architecture; the EMA teacher is "
            "the student's own: use 'consistent'."
        )


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source`` for floating-point parameters,
    a copy for buffers and non-floating parameters (in place; the modules must have the same
    state-dict keys and shapes)."""
    params = dict(source.named_parameters())
    for name, param in target.named_parameters():
        src = params[name].detach()
        if momentum == 0.0 or not param.dtype.is_floating_point:
            param.copy_(src)
        else:
            param.mul_(momentum).add_(src.to(param.dtype), alpha=1.0 - momentum)
    buffers = dict(source.named_buffers())
    for name, buf in target.named_buffers():
        buf.copy_(buffers[name])


class EMATeacher(Teacher):
    """A :class:`~kd_detr.distill.teacher.Teacher` whose model is an EMA of the student.

    Args:
        model (nn.Module): the teacher's own copy of the student (see :meth:`from_student`).
        cfg: the student's config (teacher and student share classes and input format).
        momentum (float): ``MODEL.KD.TEACHER.EMA.MOMENTUM``.
        start_iter (int): ``MODEL.KD.TEACHER.EMA.START_ITER``.

    ``num_updates`` counts the updates; it and the weights are the checkpointed state.
    """

    def __init__(self, model: nn.Module, cfg, *, momentum: float, start_iter: int):
        super().__init__(model, cfg, temperature=cfg.MODEL.KD.TEMPERATURE)
        self.momentum = float(momentum)
        self.start_iter = int(start_iter)
        self.num_updates = 0
        self.loaded = False  # set by load_state_dict (a resumed run)

    @classmethod
    def from_student(cls, cfg, student: nn.Module) -> "EMATeacher":
        """A frozen copy of the (DDP-unwrapped) student."""
        check_ema_config(cfg)
        model = copy.deepcopy(student)
        ema = cfg.MODEL.KD.TEACHER.EMA
        teacher = cls(model, cfg, momentum=ema.MOMENTUM, start_iter=ema.START_ITER)
        logger.info(
            f"EMA teacher: a copy of the student, momentum {teacher.momentum}, KD from iteration "
            f"{teacher.start_iter}"
        )
        return teacher

    def active(self, iteration: int) -> bool:
        """Whether the KD losses are applied at ``iteration`` (not during the burn-in)."""
        return iteration >= self.start_iter

    def momentum_at(self, iteration: int) -> float:
        """The momentum of the update after the optimizer step of ``iteration`` (0 in burn-in)."""
        return self.momentum if iteration >= self.start_iter else 0.0

    def update(self, student: nn.Module, iteration: int) -> None:
        """Average the (unwrapped) student into the teacher after the step of ``iteration``."""
        ema_update_(self.model, student, self.momentum_at(iteration))
        self.num_updates += 1

    def copy_from(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of the student (e.g. after its weights were loaded)."""
        ema_update_(self.model, student, 0.0)

    def state_dict(self) -> Dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state.get("num_updates", 0))
        self.freeze()
        self.loaded = True

    def __repr__(self):
        return (
            f"EMATeacher({type(self.model).__name__}, {sum(p.numel() for p in self.parameters()):,}"
            f" parameters, momentum={self.momentum}, start_iter={self.start_iter}, "
            f"num_updates={self.num_updates})"
        )
