# Copyright (c) kd_detr contributors.
"""Reliability of what runs write and load: atomic checkpoints (a kill during a save loses
nothing), fallback to the last readable checkpoint, no silent overwrite, weights that do not fit
the model, non-checkpoint files, --resume with another model or another teacher."""
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import unittest

import torch
from torch import nn

from detectron2.engine import default_argument_parser

import train_net
from kd_detr.checkpoint import SafeCheckpointer, is_readable_checkpoint
from kd_detr.engine import KDTrainer

from .common import REPO_ROOT, tiny_demo_opts
from .kd_helpers import FixedBatchKDTrainer, kd_cfg, save_teacher
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

DEMO_DIR = os.path.join(REPO_ROOT, "configs", "demo")
DEMO = os.path.join(DEMO_DIR, "dab_detr_efflite0_demo.yaml")


def tiny_run_opts(tmp):
    return tiny_demo_opts(os.path.join(tmp, "data"), size=64) + ["TEST.EVAL_PERIOD", "0"]


def run_train_net(*argv):
    return train_net.main(default_argument_parser().parse_args(list(argv)))


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from kd_detr.checkpoint import SafeCheckpointer

    torch.manual_seed(0)
    checkpointer = SafeCheckpointer(torch.nn.Linear(4, 3), save_dir=sys.argv[1])
    checkpointer.save("model_0000009")

    def dying_save(obj, f, *args, **kwargs):  # half a file on disk, then the process is killed
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    checkpointer.save("model_final")
    """
)


class TestAtomicCheckpoints(unittest.TestCase):
    def test_kill_during_save_keeps_the_previous_checkpoint_and_resumes(self):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, tmp], env=env)
            self.assertEqual(proc.returncode, -signal.SIGKILL)
            self.assertFalse(os.path.exists(os.path.join(tmp, "model_final.pth")))
            with open(os.path.join(tmp, "last_checkpoint")) as f:
                self.assertEqual(f.read(), "model_0000009.pth")
            torch.manual_seed(0)
            expected = nn.Linear(4, 3).state_dict()
            model = nn.Linear(4, 3)
            SafeCheckpointer(model, save_dir=tmp).resume_or_load("", resume=True)
            for key, value in expected.items():
                self.assertTrue(torch.equal(model.state_dict()[key], value), key)

    def test_unreadable_last_checkpoint_falls_back_with_a_warning(self):
        with tempfile.TemporaryDirectory() as tmp:
            checkpointer = SafeCheckpointer(nn.Linear(2, 2), save_dir=tmp)
            checkpointer.save("model_0000004")
            checkpointer.save("model_0000009")
            with open(os.path.join(tmp, "model_final.pth"), "wb"):
                pass  # the 0-byte file an interrupted plain torch.save leaves
            checkpointer.tag_last_checkpoint("model_final.pth")
            self.assertFalse(is_readable_checkpoint(os.path.join(tmp, "model_final.pth")))
            with self.assertLogs("kd_detr.checkpoint.safe_checkpointer", "WARNING") as logs:
                path = checkpointer.get_checkpoint_file()
            self.assertEqual(path, os.path.join(tmp, "model_0000009.pth"))
            self.assertIn("model_final.pth", logs.output[0])
            self.assertIn("model_0000009.pth", logs.output[0])
            for name in ("model_0000004.pth", "model_0000009.pth"):
                os.remove(os.path.join(tmp, name))
            with self.assertRaisesRegex(RuntimeError, "no other readable checkpoint"):
                checkpointer.get_checkpoint_file()

    def test_text_file_as_weights_is_named(self):
        with tempfile.TemporaryDirectory() as tmp:
            text = os.path.join(tmp, "weights.pth")
            with open(text, "w") as f:
                f.write("not a checkpoint\n")
            with self.assertRaisesRegex(ValueError, "weights.pth is not a checkpoint"):
                SafeCheckpointer(nn.Linear(2, 2)).load(text)
            teacher = save_teacher(tmp)
            cfg = kd_cfg(tmp, teacher, "MODEL.KD.TEACHER.WEIGHTS", text)
            with self.assertRaisesRegex(ValueError, "weights.pth is not a checkpoint"):
                KDTrainer(cfg)


class TestRunGuards(unittest.TestCase):
    """train_net.py on a tiny demo split."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        cls.opts = tiny_run_opts(cls.tmp)
        cls.out = os.path.join(cls.tmp, "run")
        run_train_net("--config-file", DEMO, "OUTPUT_DIR", cls.out, *cls.opts)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_fresh_run_does_not_overwrite_checkpoints(self):
        final = os.path.join(self.out, "model_final.pth")
        before = os.path.getmtime(final)
        with self.assertRaisesRegex(FileExistsError, "--resume.*another OUTPUT_DIR.*OVERWRITE"):
            run_train_net("--config-file", DEMO, "OUTPUT_DIR", self.out, *self.opts)
        self.assertEqual(os.path.getmtime(final), before)
        other = os.path.join(self.tmp, "overwrite")
        run_train_net("--config-file", DEMO, "OUTPUT_DIR", other, *self.opts)
        run_train_net(
            "--config-file", DEMO, "OUTPUT_DIR", other, *self.opts, "OVERWRITE_OUTPUT_DIR", "True"
        )

    def test_eval_only_needs_weights(self):
        out = os.path.join(self.tmp, "eval")
        with self.assertRaisesRegex(ValueError, "--eval-only needs trained weights"):
            run_train_net("--config-file", DEMO, "--eval-only", "OUTPUT_DIR", out, *self.opts)
        results = run_train_net(
            "--config-file", DEMO, "--eval-only", "OUTPUT_DIR", out, *self.opts,
            "MODEL.WEIGHTS_MIN_LOADED_PERCENT", "0",
        )  # fmt: skip
        self.assertIn("bbox", results)

    def test_weights_of_another_architecture_stop(self):
        deformable = os.path.join(DEMO_DIR, "deformable_detr_efflite0_demo.yaml")
        weights = os.path.join(self.out, "model_final.pth")
        with self.assertRaisesRegex(ValueError, "besides the class heads these are not filled"):
            run_train_net(
                "--config-file", deformable, "OUTPUT_DIR", os.path.join(self.tmp, "other"),
                *self.opts, "MODEL.WEIGHTS", weights,
            )  # fmt: skip
        with self.assertRaisesRegex(ValueError, "--eval-only would evaluate a partly random"):
            run_train_net(
                "--config-file", deformable, "--eval-only", "OUTPUT_DIR",
                os.path.join(self.tmp, "other_eval"), *self.opts, "MODEL.WEIGHTS", weights,
            )  # fmt: skip

    def test_resume_with_another_models_checkpoint(self):
        lite2 = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite2_demo.yaml")
        with self.assertRaisesRegex(ValueError, "checkpoint of another model"):
            run_train_net(
                "--config-file", lite2, "--resume", "OUTPUT_DIR", self.out, *self.opts,
                "SOLVER.MAX_ITER", "4",
            )  # fmt: skip

    def test_bad_solver_and_output_dir_are_one_line_errors(self):
        out = os.path.join(self.tmp, "bad")
        for key, value, message in (
            ("SOLVER.MAX_ITER", "0", "SOLVER.MAX_ITER is 0"),
            ("SOLVER.IMS_PER_BATCH", "0", "SOLVER.IMS_PER_BATCH is 0"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                run_train_net("--config-file", DEMO, "OUTPUT_DIR", out, *self.opts, key, value)
        blocker = os.path.join(self.tmp, "a_file")
        open(blocker, "w").close()
        with self.assertRaisesRegex(ValueError, "cannot be written"):
            run_train_net(
                "--config-file", DEMO, "OUTPUT_DIR", os.path.join(blocker, "x"), *self.opts
            )


class TestTeacherFingerprint(unittest.TestCase):
    def test_resume_with_another_teacher_stops(self):
        with tempfile.TemporaryDirectory() as tmp:
            first = save_teacher(tmp, name="teacher_a")
            trainer = FixedBatchKDTrainer(kd_cfg(tmp, first))
            trainer.resume_or_load(resume=False)
            trainer.train()
            second = save_teacher(tmp, seed=7, name="teacher_b")
            cfg = kd_cfg(tmp, second, "SOLVER.MAX_ITER", "3")
            resumed = FixedBatchKDTrainer(cfg)
            with self.assertRaisesRegex(ValueError, "another teacher.*teacher_a.*teacher_b"):
                resumed.resume_or_load(resume=True)
            same = FixedBatchKDTrainer(kd_cfg(tmp, first, "SOLVER.MAX_ITER", "3"))
            same.resume_or_load(resume=True)  # the original teacher: fine
            self.assertEqual(same.start_iter, 2)
