# Copyright (c) kd_detr contributors.
"""EMA self-distillation (MODEL.KD.TEACHER.EMA): the update against a float64 hand formula, the
teacher's hygiene (optimizer, gradients, DDP), burn-in without KD, exact resume, bad input."""
import copy
import os
import socket
import tempfile
import unittest
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from kd_detr.config import load_config
from kd_detr.distill import EMATeacher, check_ema_config
from kd_detr.engine import KDTrainer
from kd_detr.engine.kd_hooks import EMAUpdateHook, KDWeightSchedule

from .hf_reference import load_convert_checkpoint_cli
from .kd_helpers import TINY_CONFIG, TINY_OPTS, FixedBatchKDTrainer, kd_cfg, spy, tiny_cfg
from .model_helpers import assert_loads_strictly, single_thread_module

setUpModule, tearDownModule = single_thread_module()


def ema_cfg(output_dir, *opts, freeze=True):
    """The tiny KD config of kd_helpers with an EMA teacher instead of the external one."""
    cfg = kd_cfg(output_dir, "", "MODEL.KD.TEACHER.EMA.ENABLED", "True", *opts)
    cfg.defrost()
    cfg.MODEL.KD.TEACHER.CONFIG_FILE = ""
    cfg.MODEL.KD.TEACHER.OPTS = []
    if freeze:
        cfg.freeze()
    return cfg


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)  # running stats and an integer counter: buffers


def _ema_settings(momentum, start_iter):
    cfg = load_config(freeze=False)
    cfg.MODEL.KD.ENABLED = True
    cfg.MODEL.KD.TEACHER.EMA.ENABLED = True
    cfg.MODEL.KD.TEACHER.EMA.MOMENTUM = momentum
    cfg.MODEL.KD.TEACHER.EMA.START_ITER = start_iter
    return cfg


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestEMAUpdate(unittest.TestCase):
    def test_update_against_float64_formula(self):
        torch.manual_seed(0)
        student = _Net()
        teacher = EMATeacher.from_student(_ema_settings(0.9, 3), student)
        expected = {n: p.detach().double().clone() for n, p in student.named_parameters()}
        for it in range(8):
            with torch.no_grad():  # an "optimizer step" and a forward that moves the BN stats
                for p in student.parameters():
                    p.add_(torch.randn_like(p))
            student.train()
            student.bn(torch.randn(5, 4))
            teacher.update(student, it)
            m = 0.0 if it < 3 else 0.9
            for name, p in student.named_parameters():
                expected[name] = m * expected[name] + (1 - m) * p.detach().double()
        self.assertEqual(teacher.num_updates, 8)
        for name, p in teacher.model.named_parameters():
            torch.testing.assert_close(p.double(), expected[name], rtol=0, atol=1e-6, msg=name)
            self.assertFalse(torch.allclose(p, dict(student.named_parameters())[name]), name)
        for name, buf in teacher.model.named_buffers():  # copied, not averaged
            self.assertTrue(torch.equal(buf, dict(student.named_buffers())[name]), name)
        self.assertEqual(int(teacher.model.bn.num_batches_tracked), 8)
        self.assertFalse(teacher.model.training)
        self.assertFalse(any(p.requires_grad for p in teacher.model.parameters()))

    def test_ddp_student_is_averaged_unwrapped(self):
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
        try:
            torch.manual_seed(0)
            ddp = DistributedDataParallel(_Net())
            teacher = EMATeacher.from_student(_ema_settings(0.5, 0), ddp.module)
            self.assertNotIsInstance(teacher.model, DistributedDataParallel)
            self.assertIsInstance(teacher.model, _Net)
            ddp_storages = {p.data_ptr() for p in ddp.parameters()}
            self.assertFalse({p.data_ptr() for p in teacher.model.parameters()} & ddp_storages)
            before = copy.deepcopy(teacher.model.fc.weight)
            with torch.no_grad():
                ddp.module.fc.weight.add_(1.0)
            hook = EMAUpdateHook(teacher)
            with EventStorage(0) as storage:
                hook.trainer = SimpleNamespace(model=ddp, iter=0, storage=storage)
                hook.after_step()
                self.assertEqual(storage.latest()["ema_momentum"][0], 0.5)
            torch.testing.assert_close(teacher.model.fc.weight, before + 0.5)
        finally:
            dist.destroy_process_group()


class _Record(HookBase):
    """Per iteration: the logged loss keys, and whether teacher and student are equal."""

    def __init__(self):
        self.keys, self.equal = {}, {}

    def after_step(self):
        it, trainer = self.trainer.iter, self.trainer
        self.keys[it] = {k for k in trainer.storage.latest() if k.startswith("loss_")}
        student = trainer.model.state_dict()
        self.equal[it] = all(
            torch.equal(v, student[k]) for k, v in trainer.teacher.model.state_dict().items()
        )


class _Snapshot(HookBase):
    def __init__(self, iteration):
        self.iteration, self.state = iteration, None

    def after_step(self):
        if self.trainer.iter == self.iteration:
            self.state = copy.deepcopy(
                {"ema": self.trainer.teacher.state_dict(), "model": self.trainer.model.state_dict()}
            )


def _latest_losses(trainer):
    return {k: v for k, (v, _) in trainer.storage.latest().items() if k.startswith("loss_")}


class TestEMATrainer(unittest.TestCase):
    """Three iterations with burn-in until iteration 1 (checkpoint after iteration 1), and a run
    resumed from that checkpoint that trains iteration 2 again."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        opts = ["MODEL.KD.TEACHER.EMA.START_ITER", "1", "MODEL.KD.TEACHER.EMA.MOMENTUM", "0.9",
                "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2"]  # fmt: skip
        cls.cfg = ema_cfg(os.path.join(cls._tmp.name, "out"), *opts)
        torch.manual_seed(0)
        trainer = cls.trainer = FixedBatchKDTrainer(cls.cfg)
        trainer.resume_or_load(resume=False)
        cls.record, snapshot = _Record(), _Snapshot(1)
        trainer.register_hooks([cls.record, snapshot])
        cls.teacher_calls = []
        with spy(trainer.teacher.model, "forward_raw", cls.teacher_calls):
            trainer.train()
        cls.snapshot = snapshot.state
        with open(os.path.join(cls.cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
            f.write("model_0000001.pth")
        torch.manual_seed(123)  # another initialisation: the checkpoint must win
        trainer_b = cls.trainer_b = FixedBatchKDTrainer(cls.cfg)
        trainer_b.resume_or_load(resume=True)
        cls.resumed = copy.deepcopy(trainer_b.teacher.state_dict())
        trainer_b.train()

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_burn_in_copies_and_applies_no_kd(self):
        keys = self.record.keys
        self.assertFalse([k for k in keys[0] if k.startswith("loss_kd_")], keys[0])
        self.assertIn("loss_class", keys[0])
        for it in (1, 2):
            self.assertIn("loss_kd_cls_general", keys[it])
            self.assertIn("loss_kd_giou_specific_0", keys[it])
        self.assertEqual(len(self.teacher_calls), 2)  # no teacher forward in the burn-in
        self.assertTrue(all(not c["training"] and not c["grad"] for c in self.teacher_calls))
        self.assertEqual(self.record.equal, {0: True, 1: False, 2: False})

    def test_teacher_outside_optimizer_ddp_and_gradients(self):
        trainer = self.trainer
        teacher = trainer.teacher
        self.assertIsInstance(teacher, EMATeacher)
        ids = {id(p) for p in teacher.parameters()}
        optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        self.assertFalse(ids & optimized)
        self.assertFalse(ids & {id(p) for p in trainer.model.parameters()})
        self.assertNotIsInstance(teacher.model, DistributedDataParallel)
        self.assertFalse(teacher.model.training)
        for p in teacher.parameters():
            self.assertFalse(p.requires_grad)
            self.assertIsNone(p.grad)
        self.assertEqual(teacher.num_updates, 3)

    def test_checkpoint_holds_the_ema_weights(self):
        path = os.path.join(self.cfg.OUTPUT_DIR, "model_0000001.pth")
        checkpoint = torch.load(path, weights_only=False)
        plain = set(build_model(tiny_cfg()).state_dict())
        self.assertEqual(set(checkpoint["model"]), plain)  # the student alone
        self.assertEqual(set(checkpoint["kd_ema_teacher"]["model"]), plain)
        self.assertEqual(checkpoint["kd_ema_teacher"]["num_updates"], 2)
        self.assertNotIn("kd_teacher", checkpoint)
        for name, value in self.snapshot["ema"]["model"].items():
            self.assertTrue(torch.equal(checkpoint["kd_ema_teacher"]["model"][name], value), name)

    def test_ema_teacher_converts_to_a_model_of_its_own(self):
        """``convert_checkpoint.py --source kd_ema``: the EMA weights as {"model": ...}, loadable
        strictly into the student's architecture; an existing output is kept."""
        cli = load_convert_checkpoint_cli()
        path = os.path.join(self.cfg.OUTPUT_DIR, "model_0000001.pth")
        out = os.path.join(self._tmp.name, "ema.pth")
        args = ["--source", "kd_ema", "--config-file", TINY_CONFIG, path, out, *TINY_OPTS]
        cli.main(args)
        converted = torch.load(out, weights_only=False)["model"]
        self.assertEqual(set(converted), set(self.snapshot["ema"]["model"]))
        for name, value in self.snapshot["ema"]["model"].items():
            self.assertTrue(torch.equal(converted[name], value), name)
        assert_loads_strictly(self, build_model(tiny_cfg()), out)
        with self.assertRaisesRegex(SystemExit, "exists: .* --overwrite"):
            cli.main(args)
        # A checkpoint without an EMA teacher: the error names what the file has.
        plain = os.path.join(self._tmp.name, "plain.pth")
        torch.save({"model": converted, "iteration": 3}, plain)
        with self.assertRaisesRegex(ValueError, r"no EMA teacher .*\['iteration', 'model'\]"):
            cli.main(["--overwrite"] + args[:4] + [plain, out, *TINY_OPTS])

    def test_resume_continues_exactly(self):
        self.assertEqual(self.resumed["num_updates"], 2)
        for name, value in self.snapshot["ema"]["model"].items():
            self.assertTrue(torch.equal(self.resumed["model"][name], value), name)
        losses_a, losses_b = _latest_losses(self.trainer), _latest_losses(self.trainer_b)
        self.assertEqual(losses_a.keys(), losses_b.keys())
        for key, value in losses_a.items():
            self.assertAlmostEqual(value, losses_b[key], places=6, msg=key)
        final_b = self.trainer_b.teacher.model.state_dict()
        for name, value in self.trainer.teacher.model.state_dict().items():
            torch.testing.assert_close(value, final_b[name], rtol=1e-6, atol=1e-7, msg=name)


class TestEMAWarmup(unittest.TestCase):
    def test_kd_warmup_ramps_from_start_iter(self):
        cfg = ema_cfg(
            "unused", "MODEL.KD.TEACHER.EMA.START_ITER", "5", "MODEL.KD.WARMUP_ITERS", "4"
        )
        schedule = KDWeightSchedule.from_config(cfg)
        schedule.trainer = SimpleNamespace(iter=0)
        schedule.before_train()
        self.assertEqual([schedule.value(i) for i in (5, 6, 8, 9)], [0.25, 0.5, 1.0, 1.0])
        plain = KDWeightSchedule.from_config(tiny_cfg("MODEL.KD.WARMUP_ITERS", "4"))
        plain.trainer = SimpleNamespace(iter=0)
        plain.before_train()
        self.assertEqual(plain.value(0), 0.25)


class TestEMABadInput(unittest.TestCase):
    def test_external_teacher_with_ema_stops_naming_the_keys(self):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ema_cfg(tmp, freeze=False)
            cfg.MODEL.KD.TEACHER.CONFIG_FILE = "configs/demo/dab_detr_efflite2_demo.yaml"
            with self.assertRaisesRegex(
                ValueError, "EMA.ENABLED is True but an external teacher.*CONFIG_FILE.*remove"
            ):
                KDTrainer(cfg)

    def test_other_contradictions(self):
        cases = {
            ("MODEL.KD.TEACHER.WEIGHTS", "t.pth"): "external teacher.*WEIGHTS",
            ("MODEL.KD.TEACHER.EMA.MOMENTUM", "1.0"): "MOMENTUM must be in \\[0, 1\\)",
            ("MODEL.KD.TEACHER.EMA.START_ITER", "-1"): "START_ITER must be >= 0",
            ("MODEL.KD.INIT_STUDENT_FROM_TEACHER", "True"): "INIT_STUDENT_FROM_TEACHER",
            ("MODEL.KD.POINTS", "boxes"): "use 'consistent'",
            ("MODEL.KD.ENABLED", "False"): "needs MODEL.KD.ENABLED True",
        }
        for (key, value), message in cases.items():
            cfg = ema_cfg("unused", key, value)
            with self.subTest(key=key), self.assertRaisesRegex(ValueError, message):
                check_ema_config(cfg)


if __name__ == "__main__":
    unittest.main()
