# Copyright (c) kd_detr contributors.
"""The frozen teacher of knowledge distillation, built from its own config and weights.

:func:`build_teacher` builds the teacher from ``MODEL.KD.TEACHER.{CONFIG_FILE, OPTS, WEIGHTS}``
and checks its classes against the student's. The result is a :class:`Teacher`, a plain Python
holder rather than an ``nn.Module`` attribute of the student: the student's ``train()``,
``state_dict()``, optimizer and DDP wrapper never see the teacher.
"""
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from ..checkpoint import SafeCheckpointer
from ..config import load_config
from ..data import register_from_config
from ..modeling.num_classes import num_classes
from .class_mapping import build_class_mapping, map_teacher_logits
from .losses import final_layer_targets
from .weights import foreground_weights

__all__ = [
    "Teacher",
    "build_teacher",
    "init_student_from_teacher",
    "load_teacher_weights",
    "teacher_class_index",
]

logger = logging.getLogger(__name__)

_CHANNEL_FLIPS = {("RGB", "BGR"), ("BGR", "RGB")}


class Teacher:
    """A frozen teacher model and how to feed it the student's batches.

    The model stays in eval mode with ``requires_grad`` off, and runs under ``torch.no_grad()``
    inside whatever autocast context the caller (the student's training step) has entered.

    Attributes:
        model (nn.Module): the teacher (e.g. DABDETR), frozen.
        cfg (CfgNode): its frozen config.
        class_index (list[int] or None): teacher class of each student class (None: identical
            class lists).
        flip_channels (bool): the student's INPUT.FORMAT is the teacher's with R and B swapped.
        temperature (float): KD temperature, used to fold unmapped softmax classes.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg,
        *,
        class_index: Optional[Sequence[int]] = None,
        flip_channels: bool = False,
        temperature: float = 1.0,
    ):
        self.model = model
        self.cfg = cfg
        self.class_index = None if class_index is None else list(class_index)
        self.flip_channels = flip_channels
        self.temperature = float(temperature)
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def softmax(self) -> bool:
        """True for softmax classifiers (C + 1 logits, background last), False for sigmoid.
        Models without ``use_focal`` (Detectron2's R-CNNs) are softmax classifiers."""
        return not getattr(self.model, "use_focal", False)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def freeze(self) -> "Teacher":
        """Put the model in eval mode and turn ``requires_grad`` off (returns self)."""
        self.model.eval()
        self.model.requires_grad_(False)
        return self

    def active(self, iteration: int) -> bool:
        """Whether the KD losses are applied at ``iteration`` (always for a frozen teacher; see
        :class:`~kd_detr.distill.ema.EMATeacher`)."""
        return True

    def is_frozen(self) -> bool:
        return not self.model.training and not any(p.requires_grad for p in self.parameters())

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """The teacher's normalised, padded images of the student's batch (its own pixel
        mean/std and size divisibility; channels flipped when the input formats differ)."""
        if self.flip_channels:
            batched_inputs = [dict(x, image=x["image"].flip(0)) for x in batched_inputs]
        return self.model.preprocess_image(batched_inputs)

    @torch.no_grad()
    def __call__(self, batched_inputs: List[Dict], extra_query_groups=None) -> Dict:
        """Raw outputs (``forward_raw``) of the batch and extra query groups, without gradient.

        A teacher switched to training mode by someone else is put back in eval mode first.
        """
        if self.model.training:
            logger.warning("The teacher was in training mode; switching it back to eval mode.")
            self.model.eval()
        return self.model.forward_raw(self.preprocess_image(batched_inputs), extra_query_groups)

    @torch.no_grad()
    def query_content(
        self, batch_size: int, outputs: Optional[Dict] = None
    ) -> Optional[torch.Tensor]:
        """(B, N, d_t) content vectors its detection queries start from (zeros for DAB-DETR
        without patterns), or None for models without box queries.

        ``outputs`` (the teacher's ``forward_raw`` output) supplies them when its "layers" hold
        "query_content" (Deformable DETR, whose two-stage queries depend on the image).
        """
        return self.model.detection_query_content(batch_size, outputs or {})

    def map_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K_t) teacher logits -> (..., K_s) logits in the student's class space."""
        return map_teacher_logits(logits, self.class_index, self.softmax, self.temperature)

    def targets(
        self, group_outputs: Dict, point_weights: bool = True, distributions: bool = False
    ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """KD targets of one point group: the teacher's final layer, detached, in the student's
        class space, and the foreground weights of the points.

        Args:
            group_outputs (dict): "pred_logits" (L, B, M, K_t), "pred_boxes" (L, B, M, 4); with
                ``distributions`` also "pred_corners" (L, B, M, 4 (R + 1)) and "initial_boxes"
                (B, M, 4).
            point_weights (bool): compute the weights (else None).
            distributions (bool): add the box distributions ("distributions" KD input): the
                final layer's "pred_corners" (B, M, 4 (R + 1)), "initial_boxes" (B, M, 4) and
                the model's "corner_offsets" (R + 1,), detached.

        Returns:
            tuple: ({"pred_logits" (B, M, K_s), "pred_boxes" (B, M, 4), ...}, weights (B, M)).
        """
        final = final_layer_targets(group_outputs)
        if distributions:
            final["pred_corners"] = group_outputs["pred_corners"][-1].detach()
            final["initial_boxes"] = group_outputs["initial_boxes"].detach()
            final["corner_offsets"] = self.model.corner_offsets().detach()
        weights = None
        if point_weights:
            weights = foreground_weights(final["pred_logits"], self.softmax, self.class_index)
        final["pred_logits"] = self.map_logits(final["pred_logits"])
        return final, weights

    def __repr__(self):
        return (
            f"Teacher({type(self.model).__name__}, {sum(p.numel() for p in self.parameters()):,} "
            f"frozen parameters, class_index={'identity' if self.class_index is None else 'mapped'}"
            f", flip_channels={self.flip_channels})"
        )


def _class_names(cfg) -> Optional[List[str]]:
    if not cfg.DATASETS.TRAIN:
        return None
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)


def teacher_class_index(cfg, teacher_cfg, teacher_config_file: str = "") -> Optional[List[int]]:
    """Teacher class of every student class, from the class names of both configs' first
    training dataset and ``MODEL.KD.CLASS_MAPPING`` (see :func:`build_class_mapping`).

    Without class names on either side, the class counts must agree and no mapping may be given
    (the lists are then assumed identical).

    Returns:
        list[int] or None: None when the class lists are identical.

    Raises:
        ValueError: the classes differ and the mapping does not resolve them.
    """
    entries = list(cfg.MODEL.KD.CLASS_MAPPING)
    student, teacher = _class_names(cfg), _class_names(teacher_cfg)
    where = f"teacher config {teacher_config_file!r}" if teacher_config_file else "teacher config"
    if student is None or teacher is None:
        s_num, t_num = num_classes(cfg), num_classes(teacher_cfg)
        side = "student" if student is None else "teacher"
        if entries or s_num != t_num:
            raise ValueError(
                f"Cannot match teacher and student classes (student has {s_num} classes, "
                f"teacher has {t_num}; {where}): the {side} config's DATASETS.TRAIN has no "
                "'thing_classes' metadata. Give both configs a registered training dataset so "
                "that MODEL.KD.CLASS_MAPPING can map the classes by name."
            )
        logger.warning(
            f"No class names for the {side}: assuming teacher and student share their "
            f"{s_num} classes in the same order."
        )
        return None
    try:
        return build_class_mapping(student, teacher, entries)
    except ValueError as e:
        raise ValueError(f"{e} ({where})") from e


def _short(names: Sequence, limit: int = 8) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more


def load_teacher_weights(model: nn.Module, weights: str, config_file: str = "") -> None:
    """Load a checkpoint into the teacher; every key must fit.

    Raises:
        ValueError: no weights given, or missing / unexpected keys or shape mismatches (named).
        FileNotFoundError: the checkpoint file does not exist.
    """
    where = f"teacher config {config_file!r}" if config_file else "the teacher config"
    if not weights:
        raise ValueError(
            "MODEL.KD.TEACHER.WEIGHTS is empty: distillation needs a trained teacher checkpoint "
            f"for {where} (e.g. MODEL.KD.TEACHER.WEIGHTS path/to/teacher.pth)."
        )
    checkpointer = SafeCheckpointer(model)
    local = checkpointer.path_manager.get_local_path(weights)
    if not os.path.isfile(local):
        raise FileNotFoundError(
            f"Teacher weights {weights!r} (MODEL.KD.TEACHER.WEIGHTS) not found for {where}."
        )
    checkpoint = checkpointer._load_file(local)
    incompatible = checkpointer._load_model(checkpoint)
    problems, bad_shapes = [], incompatible.incorrect_shapes
    if bad_shapes:
        shapes = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in bad_shapes]
        problems.append(f"shape mismatches: {_short(shapes)}")
    wrong = {k for k, _, _ in bad_shapes}
    missing = [k for k in incompatible.missing_keys if k not in wrong]
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys: {_short(incompatible.unexpected_keys)}")
    if problems:
        raise ValueError(
            f"Teacher weights {weights!r} do not fit the model built from {where} "
            f"({type(model).__name__}): {'; '.join(problems)}. Check MODEL.KD.TEACHER."
            "CONFIG_FILE / OPTS against the checkpoint."
        )
    logger.info(f"Loaded teacher weights {weights!r} ({where})")


def _channel_flip(student_format: str, teacher_format: str, config_file: str) -> bool:
    if student_format == teacher_format:
        return False
    if (student_format, teacher_format) in _CHANNEL_FLIPS:
        return True
    raise ValueError(
        f"INPUT.FORMAT of the student ({student_format!r}) and of the teacher "
        f"({teacher_format!r}, {config_file!r}) differ and are not RGB/BGR; the teacher reads "
        "the student's images, so use the same format."
    )


def build_teacher(cfg) -> Teacher:
    """Build, load and freeze the teacher of a KD config.

    The teacher config is ``load_config(MODEL.KD.TEACHER.CONFIG_FILE, MODEL.KD.TEACHER.OPTS)``
    (its datasets registered, except the built-in demo ones), built on the student's
    ``MODEL.DEVICE`` and loaded from
    ``MODEL.KD.TEACHER.WEIGHTS``.

    Raises:
        FileNotFoundError: the teacher config or weights file does not exist.
        ValueError: unusable weights, classes that do not match (see
            :func:`teacher_class_index`), classifier types or input formats that differ.
    """
    kd = cfg.MODEL.KD
    config_file = kd.TEACHER.CONFIG_FILE
    if not config_file:
        raise ValueError("MODEL.KD.ENABLED needs a teacher: set MODEL.KD.TEACHER.CONFIG_FILE.")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"Teacher config {config_file!r} (MODEL.KD.TEACHER.CONFIG_FILE) not found."
        )
    overrides = ["MODEL.DEVICE", cfg.MODEL.DEVICE, "MODEL.KD.ENABLED", "False"]
    # The teacher's datasets give its class names; the built-in demo names are not re-registered
    # (their classes never change, their images are the student's).
    teacher_cfg = load_config(
        config_file, list(kd.TEACHER.OPTS) + overrides, register_datasets=False
    )
    register_from_config(teacher_cfg, skip=("KD_DEMO",))
    class_index = teacher_class_index(cfg, teacher_cfg, config_file)
    flip = _channel_flip(cfg.INPUT.FORMAT, teacher_cfg.INPUT.FORMAT, config_file)
    try:
        model = build_model(teacher_cfg)
    except ValueError as e:  # e.g. the class-count check, which names only a key
        raise ValueError(
            f"Building the teacher from its config failed (MODEL.KD.TEACHER.CONFIG_FILE "
            f"{config_file!r} + MODEL.KD.TEACHER.OPTS {list(kd.TEACHER.OPTS)}): {e}"
        ) from e
    student_focal = cfg.MODEL.DETR.USE_FOCAL_LOSS
    # MODEL.KD.POINTS "boxes" converts between classifier types (box_pairing.py).
    if kd.POINTS != "boxes" and getattr(model, "use_focal", None) != student_focal:
        kind = {True: "sigmoid (focal)", False: "softmax"}
        raise ValueError(
            f"The teacher ({config_file!r}) has a {kind.get(model.use_focal, 'unknown')} "
            f"classifier but the student a {kind[student_focal]} one "
            "(MODEL.DETR.USE_FOCAL_LOSS); KD-DETR needs the same classifier type."
        )
    load_teacher_weights(model, kd.TEACHER.WEIGHTS, config_file)
    teacher = Teacher(
        model, teacher_cfg, class_index=class_index, flip_channels=flip, temperature=kd.TEMPERATURE
    )
    logger.info(f"Built {teacher} from {config_file!r}")
    return teacher


def init_student_from_teacher(
    student: nn.Module, teacher: nn.Module, skip_prefixes: Sequence[str] = ("backbone.",)
) -> List[str]:
    """Copy teacher parameters and buffers into the student where names and shapes agree.

    Args:
        student (nn.Module): the student (not DDP-wrapped).
        teacher (nn.Module): the teacher model.
        skip_prefixes (Sequence[str]): state-dict prefixes left alone (the backbone).

    Returns:
        list[str]: the copied state-dict keys.
    """
    source = teacher.state_dict()
    copied, kept = [], []
    with torch.no_grad():
        for name, value in student.state_dict().items():
            if name.startswith(tuple(skip_prefixes)):
                continue
            src = source.get(name)
            if src is not None and src.shape == value.shape:
                value.copy_(src)
                copied.append(name)
            else:
                kept.append(name)
    logger.info(
        f"Initialised {len(copied)} student tensors from the teacher; {len(kept)} outside "
        f"{list(skip_prefixes)} kept (name or shape differ): {_short(kept)}"
    )
    return copied
