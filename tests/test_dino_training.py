# Copyright (c) kd_detr contributors.
"""DINO in training: the demo config on the demo data, and one KD step with a tiny DINO teacher
and a tiny DINO student."""
import itertools
import os
import tempfile
import unittest

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from kd_detr.engine.optimizer import build_optimizer
from kd_detr.engine.trainer import Trainer

from .common import REPO_ROOT
from .kd_helpers import FixedBatchKDTrainer, kd_cfg, single_thread
from .test_deformable_detr_training import TEACHER_OPTS, deformable_cfg
from .test_kd_trainer import spy

DINO_TINY = os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml")
DEMO = os.path.join(REPO_ROOT, "configs", "demo", "dino_efflite0_demo.yaml")


def setUpModule():
    global _threads
    _threads = single_thread()
    _threads.__enter__()


def tearDownModule():
    _threads.__exit__(None, None, None)


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
        # Every trainable parameter gets a gradient (denoising and encoder heads included).
        self.assertEqual(set(trainable) - reached, set())
        for key in ("loss_giou_1", "loss_class_enc", "loss_class_dn", "loss_bbox_dn_0"):
            self.assertGreater(losses[key].item(), 0, key)


class TestKDWithDINO(unittest.TestCase):
    def test_kd_step_dino_teacher_into_dino_student(self):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(1)
            teacher = build_model(deformable_cfg(DINO_TINY, *TEACHER_OPTS))
            with torch.no_grad():  # boxes that differ from their references
                teacher.bbox_embed.layers[-1].weight.normal_(std=0.1)
            DetectionCheckpointer(teacher, save_dir=tmp).save("teacher")
            base = kd_cfg(tmp, os.path.join(tmp, "teacher.pth"))
            cfg = deformable_cfg(DINO_TINY, *TEACHER_OPTS)
            cfg.MODEL.KD = base.MODEL.KD.clone()
            cfg.SOLVER = base.SOLVER.clone()
            cfg.OUTPUT_DIR, cfg.SEED, cfg.TEST.EVAL_PERIOD = base.OUTPUT_DIR, 0, 0
            cfg.defrost()
            cfg.MODEL.KD.TEACHER.CONFIG_FILE = DINO_TINY
            cfg.MODEL.KD.TEACHER.OPTS = TEACHER_OPTS
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
        self.assertIn("loss_class_dn", losses)  # the student trains with denoising
        self.assertTrue(all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses)
        t_out = t_calls[0]["out"]
        self.assertNotIn("denoising", t_out)  # the frozen teacher decodes no denoising queries
        specific = s_calls[0]["kwargs"]["extra_query_groups"][0]
        # The student decodes the teacher's own queries: selected boxes and learned content.
        torch.testing.assert_close(specific["boxes"], t_out["layers"]["reference_boxes"][0])
        tgt = trainer.teacher.model.tgt_embed.weight
        torch.testing.assert_close(specific["content"], tgt.expand(len(specific["boxes"]), -1, -1))


if __name__ == "__main__":
    unittest.main()
