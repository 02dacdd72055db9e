# Copyright (c) kd_detr contributors.
"""Shared fixtures of the KD tests: tiny DAB-DETR teacher/student configs, a teacher checkpoint,
fixed synthetic batches, a KDTrainer with a deterministic loader, a call spy and one KD step
with any DETR-family teacher and student."""
import contextlib
import itertools
import os

import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from kd_detr.engine import KDTrainer

from .common import REPO_ROOT
from .model_helpers import config_from, perturb_box_heads, single_thread  # noqa: F401

TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
# Tiny DAB-DETR (R18, d 64, 2+2 layers) with 4 classes and 6 queries; no dataset.
TINY_OPTS = [
    "MODEL.DETR.NUM_CLASSES", "4", "MODEL.DETR.NUM_QUERIES", "6",
    "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
]  # fmt: skip


def tiny_cfg(*opts):
    return config_from(TINY_CONFIG, *TINY_OPTS, *opts)


def save_teacher(
    directory, *opts, seed=1, name="teacher", config_file=TINY_CONFIG, box_heads=None
):
    """Build a teacher (``config_file`` + TINY_OPTS + ``opts``; by default the tiny DAB-DETR)
    whose box heads (``box_heads(model)``, default ``[model.bbox_embed]``) are perturbed, and
    save it as ``directory/name.pth``; returns that path."""
    torch.manual_seed(seed)
    model = build_model(config_from(config_file, *TINY_OPTS, *opts))
    perturb_box_heads(box_heads(model) if box_heads else [model.bbox_embed])
    path = os.path.join(directory, f"{name}.pth")
    torch.save({"model": model.state_dict()}, path)  # no last_checkpoint: not a run's folder
    return path


def kd_cfg(output_dir, teacher_weights, *opts):
    """A frozen KD config: tiny student (seeded by SEED) distilled from the tiny teacher."""
    cfg = tiny_cfg(
        "OUTPUT_DIR", output_dir,
        "SEED", "0",
        "MODEL.KD.ENABLED", "True",
        "MODEL.KD.TEACHER.CONFIG_FILE", TINY_CONFIG,
        "MODEL.KD.TEACHER.WEIGHTS", teacher_weights,
        "MODEL.KD.GENERAL.NUM_POINTS", "5",
        "SOLVER.OPTIMIZER", "ADAMW",
        "SOLVER.BASE_LR", "1e-3",
        "SOLVER.BACKBONE_MULTIPLIER", "0.1",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1",
        "TEST.EVAL_PERIOD", "0",
        *opts,
    )  # fmt: skip
    cfg.MODEL.KD.TEACHER.OPTS = TINY_OPTS
    cfg.freeze()
    return cfg


def synthetic_batch(num_images, size=64, seed=0):
    """``num_images`` dataset dicts of one size (so that any split pads alike)."""
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        instances = Instances((size, size))
        xy = torch.rand(2, 2, generator=gen) * size * 0.4
        wh = torch.rand(2, 2, generator=gen) * size * 0.4 + size * 0.15
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1)[: 1 + i % 2])
        instances.gt_classes = torch.tensor([i % 4, (i + 1) % 4])[: 1 + i % 2]
        image = torch.rand(3, size, size, generator=gen) * 255
        batch.append({"image": image, "instances": instances})
    return batch


class FixedBatchKDTrainer(KDTrainer):
    """KDTrainer whose loader repeats this rank's share of one fixed batch of
    SOLVER.IMS_PER_BATCH synthetic images (deterministic, no augmentation)."""

    @classmethod
    def build_train_loader(cls, cfg):
        world, rank = comm.get_world_size(), comm.get_rank()
        per_rank = cfg.SOLVER.IMS_PER_BATCH // world
        batch = synthetic_batch(cfg.SOLVER.IMS_PER_BATCH)
        return itertools.repeat(batch[rank * per_rank : (rank + 1) * per_rank])


@contextlib.contextmanager
def spy(module, method, calls):
    """Record every call of ``module.method`` (its args, modes and output) into ``calls``."""
    bound = getattr(type(module), method)

    def wrapper(*args, **kwargs):
        record = {
            "args": args,
            "kwargs": kwargs,
            "training": module.training,
            "grad": torch.is_grad_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "autocast_cuda": torch.cuda.is_available() and torch.is_autocast_enabled("cuda"),
        }
        record["out"] = bound(module, *args, **kwargs)
        calls.append(record)
        return record["out"]

    setattr(module, method, wrapper)
    try:
        yield calls
    finally:
        delattr(module, method)


def kd_student_cfg(config_file, output_dir, teacher_weights, opts=()):
    """A (not frozen) KD config whose student is ``config_file`` with ``opts`` and TINY_OPTS,
    with the KD and solver settings of :func:`kd_cfg`."""
    base = kd_cfg(output_dir, teacher_weights)
    cfg = config_from(config_file, *opts, *TINY_OPTS)
    cfg.MODEL.KD = base.MODEL.KD.clone()
    cfg.SOLVER = base.SOLVER.clone()
    cfg.OUTPUT_DIR, cfg.SEED, cfg.TEST.EVAL_PERIOD = base.OUTPUT_DIR, 0, 0
    return cfg


def run_kd_step(cfg, teacher_config, teacher_opts):
    """One sigmoid-mode KD iteration of ``cfg`` (a copy) with the teacher ``teacher_config`` +
    ``teacher_opts`` + TINY_OPTS, spying on the teacher's ``forward_raw`` and the student's
    ``forward``.

    Returns:
        tuple: (trainer, logged ``loss_*`` values, teacher calls, student calls).
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.KD.TEACHER.CONFIG_FILE = teacher_config
    cfg.MODEL.KD.TEACHER.OPTS = list(teacher_opts) + TINY_OPTS
    cfg.MODEL.KD.MODE = "sigmoid"
    cfg.SOLVER.MAX_ITER = 1
    cfg.freeze()
    trainer = FixedBatchKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    t_calls, s_calls = [], []
    with spy(trainer.teacher.model, "forward_raw", t_calls), spy(
        trainer.model, "forward", s_calls
    ):
        trainer.train()
    losses = {k: v for k, (v, _) in trainer.storage.latest().items() if k.startswith("loss_")}
    return trainer, losses, t_calls, s_calls


def assert_kd_losses(test, losses):
    """Every KD term of both point groups (last layer and layer 0) is positive, all finite."""
    for group in ("general", "specific"):
        for term in ("cls", "bbox", "giou"):
            test.assertGreater(losses[f"loss_kd_{term}_{group}"], 0)
            test.assertGreater(losses[f"loss_kd_{term}_{group}_0"], 0)
    test.assertTrue(all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses)
