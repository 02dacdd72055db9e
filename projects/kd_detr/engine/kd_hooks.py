# Copyright (c) kd_detr contributors.
"""Hooks around the KD training step: teacher sanity, KD loss-weight schedule, point sampler state,
the EMA teacher's update.

They expect a trainer with ``optimizer``, ``model``, ``iter``, ``storage`` and a settable
``kd_weight`` (:class:`~kd_detr.engine.kd_trainer.KDTrainer` or its inner trainer).
"""
import logging
from typing import Dict, Optional

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase

from ..distill import EMATeacher, KDPairing, Teacher

__all__ = [
    "DistillationPointsHook", "EMAUpdateHook", "KDWeightSchedule", "TeacherSanityHook", "unwrap",
]  # fmt: skip

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class TeacherSanityHook(HookBase):
    """Checks that the teacher is frozen and outside the student; keeps it in eval mode.

    ``before_train`` raises RuntimeError when the teacher is in training mode, has trainable
    parameters, or shares parameters with the optimizer or the student. ``before_step`` puts a
    teacher that something switched to training mode back in eval mode.
    """

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def before_train(self):
        model = self.teacher.model
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if model.training or trainable:
            raise RuntimeError(
                f"The teacher must be frozen and in eval mode: training={model.training}, "
                f"{len(trainable)} trainable parameters {trainable[:5]}"
            )
        ids = {id(p) for p in model.parameters()}
        in_optimizer = sum(
            id(p) in ids for g in self.trainer.optimizer.param_groups for p in g["params"]
        )
        in_student = sum(id(p) in ids for p in self.trainer.model.parameters())
        if in_optimizer or in_student:
            raise RuntimeError(
                f"Teacher parameters leaked into training: {in_optimizer} in the optimizer, "
                f"{in_student} in the student"
            )
        logger.info(f"Teacher check passed: {self.teacher}")

    def before_step(self):
        if self.teacher.model.training:
            logger.warning("The teacher was switched to training mode; back to eval mode.")
            self.teacher.model.eval()


class KDWeightSchedule(HookBase):
    """Multiplier of every KD loss: ``factor`` after a linear warm-up of ``warmup_iters``.

    Iteration i gets ``factor * min(1, (i - start + 1) / warmup_iters)`` (``factor`` when
    ``warmup_iters`` is 0), where ``start`` is the first iteration trained with KD: the first
    iteration of the run, or ``first_iter`` if later (an EMA teacher's START_ITER). ``start`` is
    the hook's checkpointed state, so a resumed run continues the ramp. The value is set as the
    trainer's ``kd_weight`` before each step and logged as "kd_weight".
    """

    def __init__(self, factor: float = 1.0, warmup_iters: int = 0, first_iter: int = 0):
        if warmup_iters < 0:
            raise ValueError(f"MODEL.KD.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        self.factor = float(factor)
        self.warmup_iters = int(warmup_iters)
        self.first_iter = int(first_iter)
        self.start_iter: Optional[int] = None

    @classmethod
    def from_config(cls, cfg) -> "KDWeightSchedule":
        ema = cfg.MODEL.KD.TEACHER.EMA
        first = ema.START_ITER if ema.ENABLED else 0
        return cls(cfg.MODEL.KD.LOSS_FACTOR, cfg.MODEL.KD.WARMUP_ITERS, first_iter=first)

    def value(self, iteration: int) -> float:
        """The multiplier of ``iteration``."""
        if self.warmup_iters == 0:
            return self.factor
        start = iteration if self.start_iter is None else self.start_iter
        return self.factor * min(1.0, max(iteration - start + 1, 0) / self.warmup_iters)

    def before_train(self):
        if self.start_iter is None:
            self.start_iter = max(self.trainer.iter, self.first_iter)

    def before_step(self):
        weight = self.value(self.trainer.iter)
        self.trainer.kd_weight = weight
        self.trainer.storage.put_scalar("kd_weight", weight, smoothing_hint=False)

    def state_dict(self) -> Dict:
        return {
            "start_iter": self.start_iter,
            "factor": self.factor,
            "warmup_iters": self.warmup_iters,
        }

    def load_state_dict(self, state: Dict):
        """Restore the ramp's start; the factor and warm-up length stay the config's."""
        self.start_iter = state.get("start_iter")
        saved = (state.get("factor", self.factor), state.get("warmup_iters", self.warmup_iters))
        if saved != (self.factor, self.warmup_iters):
            logger.warning(
                f"KDWeightSchedule: checkpoint had (factor, warmup_iters) = {saved}, the config "
                f"says {(self.factor, self.warmup_iters)}; using the config."
            )


class DistillationPointsHook(HookBase):
    """Carries the pairing's state in checkpoints (KD-DETR: the general point sampler's).

    The points of iteration i are a pure function of the sampler's settings and i, so restoring
    the settings (and the trainer's iteration) makes a resumed run draw the points the
    uninterrupted run would have drawn. A pairing without state checkpoints nothing.
    """

    def __init__(self, pairing: KDPairing):
        self.pairing = pairing

    def state_dict(self) -> Dict:
        return self.pairing.state_dict()

    def load_state_dict(self, state: Dict):
        self.pairing.load_state_dict(state)


class EMAUpdateHook(HookBase):
    """Averages the student into the EMA teacher after every optimizer step
    (:meth:`~kd_detr.distill.EMATeacher.update`, momentum 0 before its ``start_iter``).

    It reads the student unwrapped from DDP and runs before the periodic
    checkpointer, so the checkpoint of iteration i holds the teacher after update i. The weights
    are checkpointed by the trainer ("kd_ema_teacher"), not by this hook.
    """

    def __init__(self, teacher: EMATeacher):
        self.teacher = teacher

    def after_step(self):
        trainer = self.trainer
        self.teacher.update(unwrap(trainer.model), trainer.iter)
        trainer.storage.put_scalar(
            "ema_momentum", self.teacher.momentum_at(trainer.iter), smoothing_hint=False
        )
