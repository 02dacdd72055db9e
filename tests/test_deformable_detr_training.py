# Copyright (c) kd_detr contributors.
"""Deformable DETR in training: the demo config on the demo data, and KD steps with a Deformable
teacher (two-stage into DAB-DETR, single-stage into Deformable DETR)."""
import os
import tempfile
import unittest

import torch

from .common import REPO_ROOT
from .kd_helpers import assert_kd_losses, kd_cfg, kd_student_cfg, run_kd_step, save_teacher
from .model_helpers import single_thread_module, train_demo_steps

DEFORMABLE = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")
DEMO = os.path.join(REPO_ROOT, "configs", "demo", "deformable_detr_efflite0_demo.yaml")
TWO_STAGE = [
    "MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True", "MODEL.DETR.DEFORMABLE.TWO_STAGE", "True",
]  # fmt: skip

setUpModule, tearDownModule = single_thread_module()


class TestDemoConfigTrains(unittest.TestCase):
    def test_a_few_iterations_on_demo_data(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainable, reached, losses = train_demo_steps(self, DEMO, os.path.join(tmp, "data"))
        # Every trainable parameter but box_pos_head (extra query groups only) gets a gradient.
        unreached = set(trainable) - reached
        self.assertEqual(unreached, {n for n in trainable if n.startswith("box_pos_head.")})
        self.assertIn("loss_giou_1", losses)


class TestKDWithDeformableTeacher(unittest.TestCase):
    def run_kd(self, student_cfg_fn, teacher_opts):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(
                tmp, *teacher_opts, config_file=DEFORMABLE, box_heads=lambda m: m._heads()[1]
            )
            cfg = student_cfg_fn(tmp, weights)
            _, losses, t_calls, s_calls = run_kd_step(cfg, DEFORMABLE, teacher_opts)
        assert_kd_losses(self, losses)
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
        def student_cfg(tmp, weights):  # KD + solver settings of the DAB helpers
            return kd_student_cfg(DEFORMABLE, tmp, weights)

        self.run_kd(student_cfg, [])


if __name__ == "__main__":
    unittest.main()
