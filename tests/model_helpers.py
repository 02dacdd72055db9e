# Copyright (c) kd_detr contributors.
"""Shared by the model and checkpoint tests: configs from a file plus overrides, perturbing the
zero-initialised heads of tiny models, one intra-op thread per test module, a strict-load check
and a few training steps of a demo config."""
import contextlib
import itertools
import os
from unittest import mock

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from kd_detr.config import load_config

from .common import REPO_ROOT

TEST_CONFIGS = os.path.join(REPO_ROOT, "configs", "tests")


def config_from(config_file, *opts, freeze=False):
    """kd_detr config of ``config_file`` with ``opts`` (KEY VALUE ...) merged in."""
    return load_config(config_file, opts, freeze=freeze, register_datasets=False)


def perturb_box_heads(heads, std=0.1):
    """Redraw the last (zero-initialised) layer of each MLP box head, so that boxes move."""
    with torch.no_grad():
        for head in heads:
            head.layers[-1].weight.normal_(std=std)


def perturb_deformable_attention(model, std=0.1):
    """Redraw the (zero-initialised) attention weights and sampling offsets of every deformable
    attention, so that every gradient is non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attention_weights" in name or "sampling_offsets.weight" in name:
                p.normal_(std=std)


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: tiny models on shared CPU cores are much faster this way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_thread_module():
    """``setUpModule, tearDownModule = single_thread_module()``: the module's tests run with one
    intra-op thread, restored afterwards."""
    context = single_thread()
    return context.__enter__, lambda: context.__exit__(None, None, None)


def assert_loads_strictly(test, model, path):
    """Load the checkpoint ``path`` into ``model`` with ``DetectionCheckpointer`` and assert that
    no key is missing, unexpected or wrongly shaped."""
    checkpointer = DetectionCheckpointer(model)
    with mock.patch.object(checkpointer, "_log_incompatible_keys") as log:
        checkpointer.load(path)
    incompatible = log.call_args[0][0]
    test.assertEqual(incompatible.missing_keys, [])
    test.assertEqual(incompatible.unexpected_keys, [])
    test.assertEqual(incompatible.incorrect_shapes, [])


def train_demo_steps(test, config_file, data_root, num_steps=3):
    """Train the demo config ``config_file`` for ``num_steps`` iterations of 2 images (96 px)
    on demo data generated under ``data_root``, asserting finite losses.

    Returns:
        tuple[set[str], set[str], dict]: names of the trainable parameters, names of those that
        got a non-zero gradient in some step, and the last step's loss dict.
    """
    from kd_detr.engine.optimizer import build_optimizer
    from kd_detr.engine.trainer import Trainer

    cfg = config_from(
        config_file,
        "DATASETS.KD_DEMO.ROOT", data_root,
        "DATASETS.KD_DEMO.NUM_TRAIN", "8", "DATASETS.KD_DEMO.NUM_VAL", "2",
        "DATASETS.KD_DEMO.IMAGE_SIZE", "96",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reached, losses = set(), {}
    for batch in itertools.islice(Trainer.build_train_loader(cfg), num_steps):
        losses = model(batch)
        total = sum(losses.values())
        test.assertTrue(torch.isfinite(total), losses)
        optimizer.zero_grad()
        total.backward()
        reached |= {n for n, p in trainable.items() if p.grad is not None and p.grad.any()}
        optimizer.step()
    return set(trainable), reached, losses
