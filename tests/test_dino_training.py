# Copyright (c) kd_detr contributors.
"""DINO in training: the demo config on the demo data, and one KD step with a tiny DINO teacher
and a tiny DINO student."""
import os
import tempfile
import unittest

import torch

from .common import REPO_ROOT
from .kd_helpers import assert_kd_losses, kd_student_cfg, run_kd_step, save_teacher
from .model_helpers import single_thread_module, train_demo_steps

DINO_TINY = os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml")
DEMO = os.path.join(REPO_ROOT, "configs", "demo", "dino_efflite0_demo.yaml")

setUpModule, tearDownModule = single_thread_module()


class TestDemoConfigTrains(unittest.TestCase):
    def test_a_few_iterations_on_demo_data(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainable, reached, losses = train_demo_steps(self, DEMO, os.path.join(tmp, "data"))
        # Every trainable parameter gets a gradient (denoising and encoder heads included).
        self.assertEqual(set(trainable) - reached, set())
        for key in ("loss_giou_1", "loss_class_enc", "loss_class_dn", "loss_bbox_dn_0"):
            self.assertGreater(losses[key].item(), 0, key)


class TestKDWithDINO(unittest.TestCase):
    def test_kd_step_dino_teacher_into_dino_student(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp, config_file=DINO_TINY)
            cfg = kd_student_cfg(DINO_TINY, tmp, weights)
            trainer, losses, t_calls, s_calls = run_kd_step(cfg, DINO_TINY, [])
        assert_kd_losses(self, losses)
        self.assertIn("loss_class_dn", losses)  # the student trains with denoising
        t_out = t_calls[0]["out"]
        self.assertNotIn("denoising", t_out)  # the frozen teacher decodes no denoising queries
        specific = s_calls[0]["kwargs"]["extra_query_groups"][0]
        # The student decodes the teacher's own queries: selected boxes and learned content.
        torch.testing.assert_close(specific["boxes"], t_out["layers"]["reference_boxes"][0])
        tgt = trainer.teacher.model.tgt_embed.weight
        torch.testing.assert_close(specific["content"], tgt.expand(len(specific["boxes"]), -1, -1))


if __name__ == "__main__":
    unittest.main()
