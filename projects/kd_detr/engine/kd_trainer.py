# Copyright (c) kd_detr contributors.
"""Knowledge distillation on Detectron2's engine.

:class:`KDTrainer` is kd_detr's :class:`~kd_detr.engine.Trainer` whose inner trainer runs the KD
step (:class:`KDStepMixin`, used by :class:`KDSimpleTrainer` and :class:`KDAMPTrainer`). The step
only orchestrates the distillation layer's pieces: teacher forward (on the pairing's teacher
groups) -> the (possibly DDP-wrapped) student's training forward (on the pairing's student
groups) -> the :class:`~kd_detr.distill.KDContext` with what the terms declared -> pairing ->
every KD term -> sum with the detection losses. Hooks (:mod:`.kd_hooks`) check the teacher,
schedule the KD weight and checkpoint the pairing's state. The teacher lives outside the
student's module tree, so DDP wraps the student alone, and the optimizer and the checkpoints'
"model" hold only the student.
"""
import contextlib
import functools
import logging
import time
from typing import Dict, FrozenSet, List

import torch
import torch.distributed as dist
from torch import nn

from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks
from detectron2.utils import comm

from ..distill import (
    EMATeacher,
    KDPairing,
    Teacher,
    TeacherFingerprint,
    build_kd_context,
    build_kd_losses,
    build_pairing,
    build_teacher,
    check_ema_config,
    ema_enabled,
    init_student_from_teacher,
    kd_inputs,
    keeping_attention_maps,
)
from .kd_hooks import (  # fmt: skip
    DistillationPointsHook,
    EMAUpdateHook,
    KDWeightSchedule,
    TeacherSanityHook,
    unwrap,
)
from .trainer import Trainer

__all__ = [
    "KDAMPTrainer",
    "KDSimpleTrainer",
    "KDStepMixin",
    "KDTrainer",
    "check_terms_fit_pairing",
    "unwrap",
]

logger = logging.getLogger(__name__)


def check_terms_fit_pairing(kd_losses, pairing: KDPairing) -> None:
    """A pairing that runs the models itself (``runs_models``, e.g. "boxes") provides the
    distillation points only: stop when a KD term reads anything else (targets, matching,
    features), naming the terms."""
    if not getattr(pairing, "runs_models", False):
        return
    names = [t for t in kd_losses if set(getattr(t, "inputs", ())) - {"points"}]
    if names:
        extra = sorted(set().union(*(set(t.inputs) for t in names)) - {"points"})
        raise ValueError(
            f"MODEL.KD.POINTS {pairing.name!r} provides distillation points only, but the KD "
            f"terms {[type(t).__name__ for t in names]} also read {extra}: use point terms "
            "(e.g. KDDETRLoss, DKDLoss)"
        )


class KDStepMixin:
    """The KD training step, mixed into SimpleTrainer / AMPTrainer (mixin first).

    Args:
        model, data_loader, optimizer: as SimpleTrainer; ``model`` is the student (optionally
            DDP-wrapped), whose ``forward(batched_inputs, extra_query_groups)`` returns
            ``(loss_dict, raw_outputs)`` in training.
        teacher (Teacher): the frozen teacher.
        kd_losses (nn.ModuleList): KD terms (``KD_LOSS_REGISTRY`` call contract).
        pairing (KDPairing): how the point terms pair the models (``MODEL.KD.POINTS``).
        kwargs: further arguments of the engine trainer (e.g. AMPTrainer's ``grad_scaler``).

    ``kd_weight`` (float, set by :class:`KDWeightSchedule`) multiplies every KD loss. Only what
    some term declared in its ``inputs`` is computed (:func:`~kd_detr.distill.kd_inputs`); the
    models keep their backbone features only when a term reads them.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        teacher: Teacher,
        kd_losses: nn.ModuleList,
        pairing: KDPairing,
        **kwargs,
    ):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.teacher = teacher
        self.kd_losses = kd_losses
        self.pairing = pairing
        self.kd_inputs: FrozenSet[str] = kd_inputs(kd_losses, pairing)
        check_terms_fit_pairing(kd_losses, pairing)
        keep = "backbone_features" in self.kd_inputs
        self.student.keep_backbone_features = keep
        self.teacher.model.keep_backbone_features = keep
        self.kd_weight = 1.0

    @property
    def student(self) -> nn.Module:
        """The student module (DDP unwrapped)."""
        return unwrap(self.model)

    # ------------------------------------------------------------------ the step
    def run_step(self):
        """SimpleTrainer's step with the KD forward (:meth:`compute_losses`)."""
        assert self.model.training, f"[{type(self).__name__}] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with self._loss_context():
            loss_dict = self.compute_losses(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self._backward(losses)
        self._sync_kd_gradients()
        if hasattr(self, "after_backward"):  # Detectron2 > v0.6
            self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self._optimizer_step()

    def _loss_context(self):
        return contextlib.nullcontext()

    def _backward(self, losses: torch.Tensor):
        losses.backward()

    def _optimizer_step(self):
        self.optimizer.step()

    def _sync_kd_gradients(self):
        """Average the gradients of learnable KD parameters over ranks (DDP does the student's;
        the KD terms live outside it)."""
        world = comm.get_world_size()
        if world == 1:
            return
        for param in self.kd_losses.parameters():
            if param.requires_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad.div_(world)

    # ------------------------------------------------------------------ losses
    def compute_losses(self, data: List[Dict]) -> Dict[str, torch.Tensor]:
        """Detection losses of the student plus the weighted KD losses of one batch.

        Runs under the caller's autocast state; the teacher inherits it.
        """
        if not self.teacher.active(self.iter):  # EMA teacher in burn-in: the student alone
            loss_dict, _ = self.model(data, extra_query_groups=[])
            return loss_dict
        if getattr(self.pairing, "runs_models", False):  # e.g. "boxes": any teacher / student
            loss_dict, context = self.pairing.run(self.model, data, self.iter)
            return self._add_kd_losses(loss_dict, context)
        points = "points" in self.kd_inputs
        t_groups = self.pairing.teacher_groups(self.iter) if points else []
        models = (self.teacher.model, self.student)
        with keeping_attention_maps(models, "attention" in self.kd_inputs):
            t_out = self.teacher(data, t_groups)
            s_groups = self.pairing.student_groups(t_out, t_groups, len(data)) if points else []
            loss_dict, s_out = self.model(data, extra_query_groups=s_groups)
        context = build_kd_context(
            self.iter, data, s_out, t_out, self.kd_inputs, student=self.student,
            teacher=self.teacher,
        )  # fmt: skip
        if points:
            context.pairs = self.pairing.pairs(context)
        return self._add_kd_losses(loss_dict, context)

    def _add_kd_losses(self, loss_dict: Dict, context) -> Dict[str, torch.Tensor]:
        """The detection losses plus every KD term of ``context``, times ``kd_weight``."""
        kd = {}
        for term in self.kd_losses:
            terms = term(context)
            clash = set(terms) & (set(kd) | set(loss_dict))
            if clash:
                raise KeyError(f"KD term {type(term).__name__} repeats loss keys {clash}")
            kd.update(terms)
        if self.kd_weight != 1.0:
            kd = {k: v * self.kd_weight for k, v in kd.items()}
        return {**loss_dict, **kd}


class KDSimpleTrainer(KDStepMixin, SimpleTrainer):
    """SimpleTrainer with the KD step (see :class:`KDStepMixin`)."""


class KDAMPTrainer(KDStepMixin, AMPTrainer):
    """AMPTrainer with the KD step: student, teacher and KD losses under CUDA autocast."""

    def _loss_context(self):
        assert torch.cuda.is_available(), "[KDAMPTrainer] CUDA is required for AMP training!"
        dtype = getattr(self, "precision", torch.float16)  # Detectron2 > v0.6 has a precision
        return torch.autocast("cuda", dtype=dtype)

    def _backward(self, losses: torch.Tensor):
        self.grad_scaler.scale(losses).backward()

    def _optimizer_step(self):
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


@contextlib.contextmanager
def _inner_trainer_factory(factory):
    """Within the block, DefaultTrainer.__init__ builds its inner trainer with ``factory``."""
    saved = d2_defaults.SimpleTrainer, d2_defaults.AMPTrainer
    d2_defaults.SimpleTrainer = functools.partial(factory, amp=False)
    d2_defaults.AMPTrainer = functools.partial(factory, amp=True)
    try:
        yield
    finally:
        d2_defaults.SimpleTrainer, d2_defaults.AMPTrainer = saved


class KDTrainer(Trainer):
    """kd_detr's Trainer distilling ``MODEL.KD.TEACHER`` into the model of ``cfg``.

    Besides Trainer's parts it builds the teacher (:func:`build_teacher`), the KD terms
    (``MODEL.KD.LOSSES``; each learnable one gets an optimizer group with lr SOLVER.BASE_LR x
    its ``lr_factor`` and no weight decay, and they are checkpointed as "kd_losses") and the
    pairing (``MODEL.KD.POINTS``, :func:`~kd_detr.distill.build_pairing`, which checks that
    both models can be distilled).
    The inner trainer is :class:`KDSimpleTrainer` (:class:`KDAMPTrainer` with
    SOLVER.AMP.ENABLED), and the KD hooks are inserted after the LR scheduler. ``build_model``
    builds the plain student, so evaluation and ``--eval-only`` use the student alone.

    With ``MODEL.KD.TEACHER.EMA.ENABLED`` the teacher is an :class:`~kd_detr.distill.EMATeacher`
    copied from the student (no external teacher), updated by :class:`EMAUpdateHook` after every
    step and checkpointed as "kd_ema_teacher"; no KD loss is computed before its ``START_ITER``.
    """

    def __init__(self, cfg):
        if not cfg.MODEL.KD.ENABLED:
            raise ValueError("KDTrainer needs MODEL.KD.ENABLED True (use Trainer otherwise).")
        kd = cfg.MODEL.KD
        check_ema_config(cfg)
        # An EMA teacher is copied from the student once it is built (_build_inner_trainer).
        self.teacher = None if ema_enabled(cfg) else build_teacher(cfg)
        self.kd_losses = build_kd_losses(cfg).to(torch.device(cfg.MODEL.DEVICE))
        # DefaultTrainer rescales SOLVER.* for the world size the same way before building.
        scaled = d2_defaults.DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        with _inner_trainer_factory(functools.partial(self._build_inner_trainer, scaled)):
            super().__init__(cfg)
        if kd.INIT_STUDENT_FROM_TEACHER:
            init_student_from_teacher(unwrap(self.model), self.teacher.model)
        self.checkpointer.add_checkpointable("kd_losses", self.kd_losses)
        if isinstance(self.teacher, EMATeacher):  # training state: its weights are checkpointed
            self.checkpointer.add_checkpointable("kd_ema_teacher", self.teacher)
        else:
            self.checkpointer.add_checkpointable(
                "kd_teacher",
                TeacherFingerprint(self.teacher.cfg, kd.TEACHER.CONFIG_FILE, kd.TEACHER.WEIGHTS),
            )

    def resume_or_load(self, resume=True):
        """Detectron2's, then an EMA teacher that the checkpoint did not restore becomes a copy
        of the student as loaded (MODEL.WEIGHTS or its initialisation)."""
        if isinstance(self.teacher, EMATeacher):
            self.teacher.loaded = False
        super().resume_or_load(resume=resume)
        if isinstance(self.teacher, EMATeacher) and not self.teacher.loaded:
            self.teacher.copy_from(unwrap(self.model))

    def _build_inner_trainer(self, cfg, model, data_loader, optimizer, amp: bool, **kwargs):
        if self.teacher is None:  # MODEL.KD.TEACHER.EMA: a copy of the unwrapped student
            self.teacher = EMATeacher.from_student(cfg, unwrap(model))
        try:
            self.pairing = build_pairing(cfg, student=unwrap(model), teacher=self.teacher)
        except ValueError:
            # A term that needs what a model lacks says so first, naming its method.
            for term in self.kd_losses:
                term.bind(unwrap(model), self.teacher.model)
            raise
        check_terms_fit_pairing(self.kd_losses, self.pairing)
        for term in self.kd_losses:  # terms whose parameters depend on the models' shapes
            term.bind(unwrap(model), self.teacher.model)
        self.kd_losses.to(self.teacher.device)
        for term in self.kd_losses:  # before DefaultTrainer builds the LR scheduler
            params = [p for p in term.parameters() if p.requires_grad]
            if params:
                lr = cfg.SOLVER.BASE_LR * term.lr_factor
                optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
        return (KDAMPTrainer if amp else KDSimpleTrainer)(
            model,
            data_loader,
            optimizer,
            teacher=self.teacher,
            kd_losses=self.kd_losses,
            pairing=self.pairing,
            **kwargs,
        )

    @property
    def kd_weight(self) -> float:
        return self._trainer.kd_weight

    @kd_weight.setter
    def kd_weight(self, value: float):
        self._trainer.kd_weight = value

    def build_hooks(self):
        ret = super().build_hooks()
        kd_hooks = [
            TeacherSanityHook(self.teacher),
            KDWeightSchedule.from_config(self.cfg),
            DistillationPointsHook(self.pairing),
        ]
        if isinstance(self.teacher, EMATeacher):
            kd_hooks.append(EMAUpdateHook(self.teacher))
        # After the LR scheduler, before checkpointing / evaluation / writers.
        after = 1 + max(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler))
        return ret[:after] + kd_hooks + ret[after:]
