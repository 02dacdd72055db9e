# Copyright (c) kd_detr contributors.
"""``import kd_detr`` registers every plug-in explicitly, and each registry's build function
names the valid choices when the config asks for an unknown one."""
import os
import tempfile
import unittest

from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, build_model

import kd_detr
from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, HF_CONVERTERS
from kd_detr.config import CONFIG_EXTENSION_REGISTRY, load_config
from kd_detr.data import DATASET_SOURCE_REGISTRY, TRAIN_MAPPER_REGISTRY, build_train_mapper
from kd_detr.distill import BOX_EVALUATOR_REGISTRY, KD_LOSS_REGISTRY, KD_PAIRING_REGISTRY
from kd_detr.evaluation import EVALUATOR_REGISTRY, build_evaluator
from kd_detr.modeling import CLASS_HEAD_REGISTRY
from kd_detr.utils import NamedRegistry, cache_root

from .common import REPO_ROOT


class TestRegistrations(unittest.TestCase):
    def test_import_kd_detr_registers_everything(self):
        self.assertEqual(
            CONFIG_EXTENSION_REGISTRY.names(),
            [
                "modeling", "distill", "distill_ctkd", "distill_detrdistill", "distill_d3etr",
                "distill_ddf", "distill_dkd", "distill_ema", "distill_fgd", "distill_fitnet",
                "distill_kdep", "distill_incremental", "distill_mgd", "distill_mlkd",
                "distill_qskd", "distill_boxes", "ov", "engine",
            ],  # fmt: skip
        )
        self.assertEqual(
            set(EVALUATOR_REGISTRY.names()), {"coco", "coco_incremental", "coco_ovd", "lvis"}
        )
        self.assertEqual(
            DATASET_SOURCE_REGISTRY.names(),
            ["COCO_JSON", "KD_DEMO", "VOC", "INCREMENTAL", "COCO_OVD"],
        )
        self.assertEqual(set(TRAIN_MAPPER_REGISTRY.names()), {"DETR_CROP", "VILD_REGIONS"})
        self.assertEqual(set(CLASS_HEAD_REGISTRY.names()), {"linear", "region_text"})
        terms = ("KDDETRLoss", "DKDLoss", "FitNetLoss", "CTKDLoss", "MLKDLoss", "FGDLoss",
                 "MGDLoss", "KDEPLoss", "DistributionKDLoss", "MaskedFeatureKDLoss",
                 "DETRDistillLoss", "QSKDLoss", "D3ETRLoss")  # fmt: skip
        for term in terms:
            self.assertIn(term, KD_LOSS_REGISTRY)
        self.assertEqual(len(KD_PAIRING_REGISTRY.names()), 5)
        self.assertIn("boxes", KD_PAIRING_REGISTRY)
        self.assertEqual(set(BOX_EVALUATOR_REGISTRY.names()), {"DETR", "GeneralizedRCNN"})
        for arch in ("DETR", "DABDETR", "DeformableDETR", "DINO", "RTDETR", "DFINE", "ViLDRCNN"):
            self.assertIn(arch, META_ARCH_REGISTRY)
        self.assertIn("ViLDROIHeads", ROI_HEADS_REGISTRY)
        self.assertTrue({"hf", "detr", "dab_detr", "detrex"} <= set(CHECKPOINT_CONVERTERS))
        self.assertEqual(
            set(HF_CONVERTERS),
            {"detr", "dab-detr", "deformable_detr", "rt_detr", "rt_detr_v2", "d_fine"},
        )
        self.assertTrue(hasattr(kd_detr, "load_config"))

    def test_named_registry(self):
        registry = NamedRegistry("THING")

        @registry.register(name="a")
        def build_a():
            return 1

        registry.register(build_a, name="b")
        self.assertEqual(registry.names(), ["a", "b"])
        self.assertIs(registry.get("b"), build_a)
        with self.assertRaisesRegex(KeyError, "'c' in the THING registry; registered: a, b"):
            registry.get("c")
        with self.assertRaises(AssertionError):
            registry.register(build_a, name="a")

    def test_unknown_choices_name_the_valid_ones(self):
        cfg = load_config(freeze=False)
        cfg.TEST.EVALUATOR = "voc"
        valid = "coco, coco_incremental, coco_ovd, lvis"
        with self.assertRaisesRegex(ValueError, f"'voc'; valid names: {valid}"):
            build_evaluator(cfg, "kd_demo_val")
        cfg = load_config(
            os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml"),
            ["MODEL.DETR.CLASS_HEAD", "mlp", "DATASETS.TRAIN", "()"],
        )
        with self.assertRaisesRegex(ValueError, "MODEL.DETR.CLASS_HEAD 'mlp'; registered: linear"):
            build_model(cfg)

    def test_two_training_mappers_cannot_be_combined(self):
        TRAIN_MAPPER_REGISTRY.register(lambda cfg: object(), name="TEST_ALWAYS")
        try:
            cfg = load_config(
                os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite0_demo.yaml"),
                ["INPUT.DETR_CROP.ENABLED", "True", "DATALOADER.NUM_WORKERS", "0"],
            )
            with self.assertRaisesRegex(ValueError, "several training mappers \\(DETR_CROP, TEST_"):
                build_train_mapper(cfg)
        finally:
            TRAIN_MAPPER_REGISTRY._obj_map.pop("TEST_ALWAYS")

    def test_cache_root(self):
        saved = os.environ.get("KD_DETR_DATA")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["KD_DETR_DATA"] = tmp
                self.assertEqual(cache_root("teachers"), os.path.join(tmp, "teachers"))
            os.environ["KD_DETR_DATA"] = ""
            self.assertEqual(
                cache_root(), os.path.join(os.path.expanduser("~"), ".cache", "kd_detr")
            )
        finally:
            if saved is None:
                os.environ.pop("KD_DETR_DATA", None)
            else:
                os.environ["KD_DETR_DATA"] = saved
