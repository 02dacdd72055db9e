# Copyright (c) kd_detr contributors.
"""KD-DETR training on Detectron2's engine.

:class:`KDTrainer` is kd_detr's :class:`~kd_detr.engine.Trainer` whose inner trainer runs the KD
step (:class:`KDStepMixin`, used by :class:`KDSimpleTrainer` and :class:`KDAMPTrainer`): take the
batch, run the frozen teacher, sample the distillation points, call the (possibly DDP-wrapped)
student once with the points as extra query groups, add the KD losses to the detection losses
and step. Hooks (:mod:`.kd_hooks`) check the teacher, schedule the KD weight and checkpoint the
point sampler. The teacher lives outside the student's module tree, so DDP wraps the student
alone, and the optimizer and the checkpoints' "model" hold only the student.
"""
import contextlib
import functools
import logging
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks
from detectron2.utils import comm

from ..distill.baselines import (
    inconsistent_pairs,
    similar_foreground_pairs,
    similar_general_pairs,
)
from ..distill.points import DistillationPointSampler, specific_points
from ..distill.registry import build_kd_losses
from ..distill.teacher import Teacher, build_teacher, init_student_from_teacher
from ..distill.weights import foreground_weights
from .kd_hooks import DistillationPointsHook, KDWeightSchedule, TeacherSanityHook
from .trainer import Trainer

__all__ = ["POINT_MODES", "KDAMPTrainer", "KDSimpleTrainer", "KDStepMixin", "KDTrainer"]

logger = logging.getLogger(__name__)

POINT_MODES = ("consistent", "inconsistent", "similar_foreground", "similar_general")
_BASELINES = {
    "inconsistent": inconsistent_pairs,
    "similar_foreground": similar_foreground_pairs,
    "similar_general": similar_general_pairs,
}

# One distillation pair: (group name, student outputs, teacher targets, point weights or None).
Pair = Tuple[str, Dict[str, torch.Tensor], Dict[str, torch.Tensor], Optional[torch.Tensor]]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class KDStepMixin:
    """The KD training step, mixed into SimpleTrainer / AMPTrainer (mixin first).

    Args:
        model, data_loader, optimizer: as SimpleTrainer; ``model`` is the student (optionally
            DDP-wrapped), whose ``forward(batched_inputs, extra_query_groups)`` returns
            ``(loss_dict, raw_outputs)`` in training.
        teacher (Teacher): the frozen teacher.
        kd_losses (nn.ModuleList): KD terms (``KD_LOSS_REGISTRY`` call contract).
        sampler (DistillationPointSampler or None): general points; None: no general group.
        points (str): one of :data:`POINT_MODES` (``MODEL.KD.POINTS``).
        specific (bool): distil at the teacher's own queries (consistent mode).
        point_weights (bool): foreground-rebalance the points (``MODEL.KD.FOREGROUND_WEIGHTS``).
        kwargs: further arguments of the engine trainer (e.g. AMPTrainer's ``grad_scaler``).

    ``kd_weight`` (float, set by :class:`KDWeightSchedule`) multiplies every KD loss.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        teacher: Teacher,
        kd_losses: nn.ModuleList,
        sampler: Optional[DistillationPointSampler] = None,
        points: str = "consistent",
        specific: bool = True,
        point_weights: bool = True,
        **kwargs,
    ):
        if points not in POINT_MODES:
            raise ValueError(f"MODEL.KD.POINTS must be one of {POINT_MODES}, got {points!r}")
        if points == "consistent":
            if sampler is None and not specific:
                raise ValueError("KD-DETR needs general and/or specific points (MODEL.KD.*)")
            student = unwrap(model)
            if not (
                hasattr(student, "detection_queries") or getattr(student, "box_query_groups", 0)
            ):
                raise ValueError(
                    f"{type(student).__name__} has no box queries to decode distillation "
                    "points: use a DAB-DETR or Deformable DETR student or a baseline "
                    "MODEL.KD.POINTS mode."
                )
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.teacher = teacher
        self.kd_losses = kd_losses
        self.sampler = sampler if points == "consistent" else None
        self.points = points
        self.specific = specific and points == "consistent"
        self.point_weights = point_weights
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
        if self.points == "consistent":
            loss_dict, pairs = self._consistent_pairs(data)
        else:
            loss_dict, pairs = self._baseline_pairs(data)
        kd = {}
        for term in self.kd_losses:
            for name, student, teacher, weights in pairs:
                terms = term(student, teacher, weights, name)
                clash = set(terms) & (set(kd) | set(loss_dict))
                if clash:
                    raise KeyError(f"KD term {type(term).__name__} repeats loss keys {clash}")
                kd.update(terms)
        if self.kd_weight != 1.0:
            kd = {k: v * self.kd_weight for k, v in kd.items()}
        return {**loss_dict, **kd}

    def _consistent_pairs(self, data) -> Tuple[Dict, List[Pair]]:
        """KD-DETR: both models decode the same specific and general points."""
        general = None
        if self.sampler is not None:  # one (1, Mg, 4) set for every image, rank and model
            general = self.sampler.group(self.iter, device=self.teacher.device)
        t_out = self.teacher(data, [] if general is None else [general])
        groups, names, targets = [], [], []
        if self.specific:
            content = self.teacher.query_content(len(data), t_out)
            d_s = self.student.transformer.d_model
            groups.append(specific_points(t_out, d_s, content))
            names.append("specific")
            targets.append(t_out["layers"])
        if general is not None:
            groups.append(general)
            names.append("general")
            targets.append(t_out["groups"][0])
        loss_dict, s_out = self.model(data, extra_query_groups=groups)
        pairs = []
        for name, s_group, t_group in zip(names, s_out["groups"], targets):
            target, weights = self.teacher.targets(t_group, self.point_weights)
            pairs.append((name, s_group, target, weights))
        return loss_dict, pairs

    def _baseline_pairs(self, data) -> Tuple[Dict, List[Pair]]:
        """The paper's baselines: pair the two models' own detection predictions."""
        t_out = self.teacher(data, [])
        loss_dict, s_out = self.model(data, extra_query_groups=[])
        keys = ("pred_logits", "pred_boxes")
        student = {k: s_out["layers"][k] for k in keys}
        teacher = {k: t_out["layers"][k][-1] for k in keys}
        teacher["pred_logits"] = self.teacher.map_logits(teacher["pred_logits"])
        pair_fn = _BASELINES[self.points]
        if self.points == "inconsistent":
            s_pair, t_pair = pair_fn(student, teacher)
        else:
            sizes = [tuple(x["image"].shape[-2:]) for x in data]
            gt = self.student.prepare_targets(data, sizes)
            matchers = (self.student.criterion.matcher, self.teacher.model.criterion.matcher)
            s_pair, t_pair = pair_fn(student, teacher, gt, *matchers)
        weights = None
        if self.point_weights:  # paired logits are already in the student's class space
            weights = foreground_weights(t_pair["pred_logits"], self.teacher.softmax)
        return loss_dict, [(self.points, s_pair, t_pair, weights)]


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
    (``MODEL.KD.LOSSES``; learnable ones get an optimizer group with lr SOLVER.BASE_LR and no
    weight decay, and are checkpointed as "kd_losses") and the general point sampler. The inner
    trainer is :class:`KDSimpleTrainer` (:class:`KDAMPTrainer` with SOLVER.AMP.ENABLED), and the
    KD hooks are inserted after the LR scheduler. ``build_model`` builds the plain student, so
    evaluation and ``--eval-only`` use the student alone.
    """

    def __init__(self, cfg):
        if not cfg.MODEL.KD.ENABLED:
            raise ValueError("KDTrainer needs MODEL.KD.ENABLED True (use Trainer otherwise).")
        kd = cfg.MODEL.KD
        self.teacher = build_teacher(cfg)
        self.kd_losses = build_kd_losses(cfg).to(self.teacher.device)
        use_general = kd.POINTS == "consistent" and kd.GENERAL.ENABLED
        self.point_sampler = DistillationPointSampler(cfg) if use_general else None
        # DefaultTrainer rescales SOLVER.* for the world size the same way before building.
        scaled = d2_defaults.DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        with _inner_trainer_factory(functools.partial(self._build_inner_trainer, scaled)):
            super().__init__(cfg)
        if kd.INIT_STUDENT_FROM_TEACHER:
            init_student_from_teacher(unwrap(self.model), self.teacher.model)
        self.checkpointer.add_checkpointable("kd_losses", self.kd_losses)

    def _build_inner_trainer(self, cfg, model, data_loader, optimizer, amp: bool, **kwargs):
        params = [p for p in self.kd_losses.parameters() if p.requires_grad]
        if params:  # before DefaultTrainer builds the LR scheduler over the groups
            optimizer.add_param_group(
                {"params": params, "lr": cfg.SOLVER.BASE_LR, "weight_decay": 0.0}
            )
        kd = cfg.MODEL.KD
        return (KDAMPTrainer if amp else KDSimpleTrainer)(
            model,
            data_loader,
            optimizer,
            teacher=self.teacher,
            kd_losses=self.kd_losses,
            sampler=self.point_sampler,
            points=kd.POINTS,
            specific=kd.SPECIFIC.ENABLED,
            point_weights=kd.FOREGROUND_WEIGHTS,
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
        kd_hooks = [TeacherSanityHook(self.teacher), KDWeightSchedule.from_config(self.cfg)]
        if self.point_sampler is not None:
            kd_hooks.append(DistillationPointsHook(self.point_sampler))
        # After the LR scheduler, before checkpointing / evaluation / writers.
        after = 1 + max(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler))
        return ret[:after] + kd_hooks + ret[after:]
