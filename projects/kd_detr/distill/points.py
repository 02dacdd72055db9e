# Copyright (c) kd_detr contributors.
"""Consistent distillation points of KD-DETR.

A point group is the dict that the box-query models take as an extra query group:
``{"boxes": (B or 1, M, 4) cxcywh in [0, 1], "content": (B or 1, M, d) or None}``. Only boxes
(and content when hidden sizes match) are shared between teacher and student: each model turns
the boxes into its own positional queries, as DAB-DETR does with its anchors.

* General points (:class:`DistillationPointSampler`): Mg random boxes, re-sampled every
  iteration from a generator seeded by (seed, iteration), identical on every rank and for both
  models.
* Specific points (:func:`specific_points`): the teacher's own detection queries, detached.
"""
import hashlib
import logging
from typing import Dict, Optional, Sequence

import torch

from detectron2.config import configurable

__all__ = ["DISTRIBUTIONS", "DistillationPointSampler", "specific_points"]

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("sigmoid_normal", "uniform")


def _seed_for(seed: int, iteration: int) -> int:
    """Stable 63-bit seed of (seed, iteration): the same in every process and Python version."""
    key = f"kd_detr.general_points:{int(seed)}:{int(iteration)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class DistillationPointSampler:
    """Random general distillation points (boxes), a pure function of (seed, iteration).

    Distributions, per box (cx, cy, w, h), with (lo, hi) = ``size_range``:

    * ``"sigmoid_normal"`` (official code): every coordinate is sigmoid(x), x ~ N(0, 1) (the
      official code sigmoids a fresh ``nn.Embedding(Mg, 4)`` weight); w and h are then clamped
      to [lo, hi], a no-op for the default (0, 1). Per coordinate: mean 0.5, std ~0.2083.
    * ``"uniform"`` (paper text): cx, cy ~ U[0, 1), w, h ~ U(lo, hi] (so w, h > 0).

    Boxes are drawn in float32 on the CPU from a ``torch.Generator`` seeded with a hash of
    (seed, iteration), then moved: every rank, the teacher and the student get the same boxes,
    and a resumed run draws what the uninterrupted run would have drawn. Unlike the official code
    (seed 42 + rank), the points do not differ between ranks.

    Args:
        num_points (int): Mg, boxes per iteration.
        distribution (str): one of :data:`DISTRIBUTIONS`.
        size_range (Sequence[float]): (lo, hi) of w and h, 0 <= lo < hi <= 1.
        seed (int): base seed.
    """

    @configurable
    def __init__(
        self,
        num_points: int = 300,
        distribution: str = "sigmoid_normal",
        size_range: Sequence[float] = (0.0, 1.0),
        seed: int = 0,
    ):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown general point distribution {distribution!r}; expected one of "
                f"{DISTRIBUTIONS} (MODEL.KD.GENERAL.DISTRIBUTION)"
            )
        lo, hi = (float(v) for v in size_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(
                f"MODEL.KD.GENERAL.SIZE_RANGE must satisfy 0 <= min < max <= 1, got {size_range}"
            )
        if num_points < 0:
            raise ValueError(f"MODEL.KD.GENERAL.NUM_POINTS must be >= 0, got {num_points}")
        self.num_points = int(num_points)
        self.distribution = distribution
        self.size_range = (lo, hi)
        self.seed = int(seed)

    @classmethod
    def from_config(cls, cfg):
        g = cfg.MODEL.KD.GENERAL
        return {
            "num_points": g.NUM_POINTS,
            "distribution": g.DISTRIBUTION,
            "size_range": tuple(g.SIZE_RANGE),
            "seed": cfg.MODEL.KD.SEED,
        }

    def generator(self, iteration: int) -> torch.Generator:
        """CPU generator seeded with the hash of (seed, iteration)."""
        return torch.Generator().manual_seed(_seed_for(self.seed, iteration))

    def sample(
        self,
        iteration: int,
        batch_size: Optional[int] = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Boxes of one iteration.

        Args:
            iteration (int): training iteration (the trainer's ``iter``).
            batch_size (int or None): None: one set shared by all images (official), shape
                (1, Mg, 4); B: B independent sets, (B, Mg, 4), image b getting set b on every rank.
            device: target device.
            dtype: target dtype.

        Returns:
            Tensor: cxcywh boxes in [0, 1], no gradient.
        """
        n = 1 if batch_size is None else int(batch_size)
        gen = self.generator(iteration)
        lo, hi = self.size_range
        shape = (n, self.num_points, 4)
        if self.distribution == "sigmoid_normal":
            boxes = torch.randn(shape, generator=gen).sigmoid()
            boxes[..., 2:] = boxes[..., 2:].clamp(lo, hi)
        else:
            boxes = torch.rand(shape, generator=gen)
            boxes[..., 2:] = lo + (hi - lo) * (1.0 - boxes[..., 2:])  # (lo, hi]
        return boxes.to(device=device, dtype=dtype)

    def group(self, iteration: int, batch_size: Optional[int] = None, device=None) -> Dict:
        """The general point group ``{"boxes": (1 or B, Mg, 4), "content": None}`` (zero
        content, as in the official code)."""
        return {"boxes": self.sample(iteration, batch_size, device), "content": None}

    __call__ = group

    def state_dict(self) -> Dict:
        return {
            "seed": self.seed,
            "num_points": self.num_points,
            "distribution": self.distribution,
            "size_range": list(self.size_range),
        }

    def load_state_dict(self, state: Dict):
        """Restore every setting from a checkpoint (logs a warning where the config differs)."""
        current = self.state_dict()
        changed = {
            k: (current[k], state[k]) for k in current if k in state and current[k] != state[k]
        }
        if changed:
            logger.warning(f"DistillationPointSampler: checkpoint overrides config {changed}")
        restored = type(self)(
            num_points=state.get("num_points", self.num_points),
            distribution=state.get("distribution", self.distribution),
            size_range=state.get("size_range", self.size_range),
            seed=state.get("seed", self.seed),
        )
        self.__dict__.update(restored.__dict__)

    def __repr__(self):
        return (
            f"{type(self).__name__}(num_points={self.num_points}, "
            f"distribution={self.distribution!r}, size_range={self.size_range}, seed={self.seed})"
        )


def specific_points(
    teacher_outputs: Dict, student_hidden_dim: int, teacher_content: Optional[torch.Tensor] = None
) -> Dict:
    """The teacher's detection queries as a point group for the student, detached.

    Boxes are the teacher's layer-0 input reference boxes, ``outputs["layers"]
    ["reference_boxes"][0]``: DAB-DETR's anchors ``sigmoid(refpoint_embed)`` (repeated per
    pattern), or the (image-dependent) initial reference boxes of Deformable DETR / DINO. The
    targets of this group are the teacher's own detection outputs (final layer).

    Args:
        teacher_outputs (dict): the teacher's ``forward_raw`` output (or its "layers" entry),
            with "reference_boxes" (L, B, N, 4).
        student_hidden_dim (int): d_s, the student's transformer width.
        teacher_content (Tensor or None): (B or 1, N, d_t) content vectors that the teacher's
            decoder started from (e.g. DINO's target embeddings, DAB-DETR's patterns from
            ``teacher.detection_queries(B)[0]``); None: zero content (DAB-DETR without patterns,
            whose content queries are zeros).

    Returns:
        dict: {"boxes": (B, N, 4) detached, "content": (B or 1, N, d) detached, or None when no
        content is given or d_t != d_s (the student then uses zero content)}.
    """
    layers = teacher_outputs.get("layers", teacher_outputs)
    refs = layers.get("reference_boxes")
    if refs is None:
        raise ValueError(
            "specific distillation points need the teacher's query boxes, but its outputs have "
            "no 'reference_boxes' (vanilla DETR has no box queries): use a DAB-DETR, Deformable "
            "DETR or DINO teacher, or set MODEL.KD.SPECIFIC.ENABLED False"
        )
    boxes = refs[0].detach()
    content = None
    if teacher_content is not None:
        bsz, num = boxes.shape[:2]
        if (
            teacher_content.dim() != 3
            or teacher_content.shape[0] not in (1, bsz)
            or teacher_content.shape[1] != num
        ):
            raise ValueError(
                f"teacher_content must be (B={bsz} or 1, N={num}, d), "
                f"got {tuple(teacher_content.shape)}"
            )
        if teacher_content.shape[-1] == student_hidden_dim:
            content = teacher_content.detach()
    return {"boxes": boxes, "content": content}
