# Copyright (c) kd_detr contributors.
"""Deformable DETR in training: the demo config on the demo data, and KD steps with a Deformable
teacher (two-stage into DAB-DETR, single-stage into Deformable DETR)."""
import itertools
import os
import tempfile
import unittest

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from kd_detr.config import add_kd_detr_config
from kd_detr.engine.optimizer import build_optimizer
from kd_detr.engine.trainer import Trainer

from .common import REPO_ROOT
from .kd_helpers import FixedBatchKDTrainer, kd_cfg, single_thread
from .test_kd_trainer import spy

DEFORMABLE = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")
DEMO = os.path.join(REPO_ROOT, "configs", "demo", "deformable_detr_efflite0_demo.yaml")
TEACHER_OPTS = [
    "MODEL.DETR.NUM_CLASSES", "4", "MODEL.DETR.NUM_QUERIES", "6",
    "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
]  # fmt: skip
TWO_STAGE = [
    "MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True", "MODEL.DETR.DEFORMABLE.TWO_STAGE", "True",
]  # fmt: skip


def setUpModule():
    global _threads
    _threads = single_thread()
    _threads.__enter__()


def tearDownModule():
    _threads.__exit__(None, None, None)


def deformable_cfg(config, *opts):
    cfg = get_cfg()
    add_kd_detr_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    return cfg


class TestDemoConfigTrains(unittest.TestCase):
    def test_a_few_iterations_on_demo_data(self):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = deformable_cfg(
                DEMO,
                "DATASETS.KD_DEMO.ROOT", os.path.join(tmp, "data"),
                "DATASETS.KD_DEMO.NUM_TRAIN", "8", "DATASETS.KD_DEMO.NUM_VAL", "2",
                "DATASETS.KD_DEMO.IMAGE_SIZE", "96",
                "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
                "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
                "MODEL.EFFICIENTNET_LITE.PRETRAINED", "False",
            )  # fmt: skip
            torch.manual_seed(0)
            model = build_model(cfg).train()
            optimizer = build_optimizer(cfg, model)
            batches = itertools.islice(Trainer.build_train_loader(cfg), 3)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            reached = set()
            for batch in batches:
                losses = model(batch)
                total = sum(losses.values())
                self.assertTrue(torch.isfinite(total), losses)
                optimizer.zero_grad()
                total.backward()
                reached |= {n for n, p in trainable.items() if p.grad is not None and p.grad.any()}
                optimizer.step()
        # Every trainable parameter but box_pos_head (extra query groups only) gets a gradient.
        unreached = set(trainable) - reached
        self.assertEqual(unreached, {n for n in trainable if n.startswith("box_pos_head.")})
        self.assertIn("loss_giou_1", losses)


class TestKDWithDeformableTeacher(unittest.TestCase):
    def run_kd(self, student_cfg_fn, teacher_opts):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(1)
            teacher = build_model(deformable_cfg(DEFORMABLE, *teacher_opts, *TEACHER_OPTS))
            with torch.no_grad():  # boxes that differ from their references
                for head in teacher._heads()[1]:
                    head.layers[-1].weight.normal_(std=0.1)
            DetectionCheckpointer(teacher, save_dir=tmp).save("teacher")
            cfg = student_cfg_fn(tmp, os.path.join(tmp, "teacher.pth"))
            cfg.defrost()
            cfg.MODEL.KD.TEACHER.CONFIG_FILE = DEFORMABLE
            cfg.MODEL.KD.TEACHER.OPTS = list(teacher_opts) + TEACHER_OPTS
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
        for group in ("general", "specific"):
            for term in ("cls", "bbox", "giou"):
                self.assertGreater(losses[f"loss_kd_{term}_{group}"], 0)
                self.assertGreater(losses[f"loss_kd_{term}_{group}_0"], 0)
        self.assertTrue(all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses)
        t_out = t_calls[0]["out"]
        specific = s_calls[0]["kwargs"]["extra_query_groups"][0]
        # The student decodes the teacher's own queries: boxes and content.
        torch.testing.assert_close(specific["boxes"], t_out["layers"]["reference_boxes"][0])
        torch.testing.assert_close(specific["content"], t_out["layers"]["query_content"])
        return t_out

    def test_two_stage_teacher_into_dab_student(self):
        t_out = self.run_kd(kd_cfg, TWO_STAGE)
        # Two-stage queries are the image-dependent top proposals (boxes with w, h > 0).
        self.assertTrue((t_out["layers"]["reference_boxes"][0][..., 2:] > 0).all())

    def test_single_stage_teacher_into_deformable_student(self):
        def student_cfg(tmp, weights):
            base = kd_cfg(tmp, weights)  # KD + solver settings of the DAB helpers
            cfg = deformable_cfg(DEFORMABLE, *TEACHER_OPTS)
            cfg.MODEL.KD = base.MODEL.KD.clone()
            cfg.SOLVER = base.SOLVER.clone()
            cfg.OUTPUT_DIR, cfg.SEED, cfg.TEST.EVAL_PERIOD = base.OUTPUT_DIR, 0, 0
            return cfg

        self.run_kd(student_cfg, [])


if __name__ == "__main__":
    unittest.main()
