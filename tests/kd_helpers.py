# Copyright (c) kd_detr contributors.
"""Shared fixtures of the KD tests: tiny DAB-DETR teacher/student configs, a teacher checkpoint,
fixed synthetic batches and a KDTrainer with a deterministic loader."""
import contextlib
import itertools
import os

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from kd_detr.config import add_kd_detr_config
from kd_detr.engine import KDTrainer

from .common import REPO_ROOT

TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
# Tiny DAB-DETR (R18, d 64, 2+2 layers) with 4 classes and 6 queries; no dataset.
TINY_OPTS = [
    "MODEL.DETR.NUM_CLASSES", "4", "MODEL.DETR.NUM_QUERIES", "6",
    "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
]  # fmt: skip


def tiny_cfg(*opts):
    cfg = get_cfg()
    add_kd_detr_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.merge_from_list(TINY_OPTS + list(opts))
    return cfg


def save_teacher(directory, *opts, seed=1, name="teacher"):
    """Build a tiny teacher with non-zero box heads, save it as ``directory/name.pth``."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(*opts))
    with torch.no_grad():
        model.bbox_embed.layers[-1].weight.normal_(std=0.1)
    DetectionCheckpointer(model, save_dir=directory).save(name)
    return os.path.join(directory, f"{name}.pth")


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
def single_thread():
    """One intra-op thread: tiny models on shared CPU cores are much faster this way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
