# Copyright (c) kd_detr contributors.
"""Shared test helpers: locating ../shared/data and optional packages, a temp-folder test case.

Tests that need the shared real data or an optional package skip locally when it is absent, but
fail under ``CI=true``, where everything must be present.
"""
import importlib
import os
import shutil
import tempfile
import unittest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get(
    "KD_DETR_SHARED_DATA", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
)


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(message):
    if in_ci():
        raise AssertionError(f"{message} (required under CI=true)")
    raise unittest.SkipTest(message)


def shared_data(*parts):
    """Path of ``../shared/data/<parts>``; skip (or fail under CI) when it does not exist."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        _missing(f"shared test data not found: {path} (see ../shared/data/README.md)")
    return path


def require_module(name):
    """Import and return an optional module; skip (or fail under CI) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        _missing(f"optional package {name!r} is not installed ({e}); run tools/bootstrap.sh")


class TempDatasetsCase(unittest.TestCase):
    """A test case with a temporary folder ``self.tmp`` and a list ``self.names`` of datasets it
    registered, both removed after each test."""

    tmp_prefix = "kd_test_"

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix=self.tmp_prefix)
        self.names = []

    def tearDown(self):
        from detectron2.data import DatasetCatalog, MetadataCatalog

        for name in self.names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def load_tool(filename: str):
    """Import ``tools/<filename>`` as a module (tools/ is not a package)."""
    import importlib.util

    path = os.path.join(REPO_ROOT, "tools", filename)
    spec = importlib.util.spec_from_file_location(f"kd_detr_tool_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_demo_opts(data_root, size=96, num_train=8, num_val=4, iters=2, warmup=0, steps="()"):
    """Overrides for a few CPU iterations of a demo config: a synthetic ``kd_demo`` split of
    ``num_train`` / ``num_val`` images of ``size`` px written under ``data_root``, batch 2, no
    ImageNet weights, no loader workers. Later overrides win (Detectron2 merges in order)."""
    return [
        "DATASETS.KD_DEMO.ROOT", data_root,
        "DATASETS.KD_DEMO.NUM_TRAIN", str(num_train), "DATASETS.KD_DEMO.NUM_VAL", str(num_val),
        "DATASETS.KD_DEMO.IMAGE_SIZE", str(size),
        "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(size),
        "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size),
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(iters),
        "SOLVER.WARMUP_ITERS", str(warmup), "SOLVER.STEPS", steps,
        "DATALOADER.NUM_WORKERS", "0", "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
    ]  # fmt: skip
