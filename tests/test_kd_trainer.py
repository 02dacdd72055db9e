# Copyright (c) kd_detr contributors.
"""KDTrainer on tiny DAB-DETRs: the KD step, teacher hygiene, resume, 2-process DDP, train_net."""
import copy
import json
import os
import tempfile
import unittest

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.engine import HookBase, default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils import comm

import train_net
from kd_detr.distill import KD_LOSS_REGISTRY, DistillationPointSampler, PointKDTerm
from kd_detr.engine import KDAMPTrainer, KDSimpleTrainer, KDWeightSchedule, launch

from .common import REPO_ROOT, tiny_demo_opts
from .kd_helpers import (
    FixedBatchKDTrainer,
    kd_cfg,
    save_teacher,
    spy,
    synthetic_batch,
    tiny_cfg,
)
from .model_helpers import single_thread_module


class LearnableScaleKDLoss(PointKDTerm):
    """A KD term with a learnable parameter: exp(s) * mean |student - teacher| final boxes."""

    @configurable
    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_config(cls, cfg):
        return {}

    def pair_losses(self, student, teacher, weights, group):
        diff = (student["pred_boxes"][-1] - teacher["pred_boxes"]).abs().mean()
        return {f"loss_kd_scale_{group}": self.log_scale.exp() * diff}


if "LearnableScaleKDLoss" not in KD_LOSS_REGISTRY:
    KD_LOSS_REGISTRY.register(LearnableScaleKDLoss)
LOSSES = ["MODEL.KD.LOSSES", "['KDDETRLoss', 'LearnableScaleKDLoss']"]


setUpModule, tearDownModule = single_thread_module()


def _state(trainer):
    """Copies of everything a resume must restore."""
    return copy.deepcopy(
        {
            "model": trainer.model.state_dict(),
            "trainer": trainer.state_dict(),
            "kd_losses": trainer.kd_losses.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
        }
    )


class _TeacherToTrainAfterIter0(HookBase):
    def after_step(self):
        if self.trainer.iter == 0:
            self.trainer.teacher.model.train()


def _assert_same(test, a, b, path="state"):
    """Nested dicts / lists / tensors / numbers are exactly equal."""
    if isinstance(a, torch.Tensor):
        test.assertTrue(torch.equal(a, b), path)
    elif isinstance(a, dict):
        test.assertEqual(a.keys(), b.keys(), path)
        for key in a:
            _assert_same(test, a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        test.assertEqual(len(a), len(b), path)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(test, x, y, f"{path}[{i}]")
    else:
        test.assertEqual(a, b, path)


def _loss_values(trainer):
    return {k: v for k, (v, _) in trainer.storage.latest().items() if k.startswith("loss_")}


class _Snapshot(HookBase):
    """Copies the trainer's state after ``iteration`` (after its checkpoint was written)."""

    def __init__(self, iteration):
        self.iteration, self.state = iteration, None

    def after_step(self):
        if self.trainer.iter == self.iteration:
            self.state = _state(self.trainer)


class TestKDTrainer(unittest.TestCase):
    """Three KD iterations (checkpoint after the second), and a run resumed from that checkpoint
    that trains the third iteration again."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        tmp = cls._tmp.name
        weights = save_teacher(tmp)
        opts = [*LOSSES, "MODEL.KD.WARMUP_ITERS", "4", "SOLVER.MAX_ITER", "3"]
        cls.cfg = kd_cfg(os.path.join(tmp, "out"), weights, "SOLVER.CHECKPOINT_PERIOD", "2", *opts)
        torch.manual_seed(0)
        trainer = cls.trainer = FixedBatchKDTrainer(cls.cfg)
        trainer.resume_or_load(resume=False)
        cls.teacher_before = copy.deepcopy(trainer.teacher.model.state_dict())
        cls.student_before = copy.deepcopy(trainer.model.state_dict())
        snapshot = _Snapshot(1)
        # Something sets the teacher to training mode after the first step.
        trainer.register_hooks([snapshot, _TeacherToTrainAfterIter0()])
        cls.teacher_calls, cls.student_calls = [], []
        with spy(trainer.teacher.model, "forward_raw", cls.teacher_calls), spy(
            trainer.model, "forward", cls.student_calls
        ):
            trainer.train()
        cls.state_a = snapshot.state
        # Interrupted after the checkpoint of iteration 1: resume in a new trainer (with another
        # KD seed in its config: the checkpoint wins) and train iteration 2 again.
        with open(os.path.join(cls.cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
            f.write("model_0000001.pth")
        cfg_b = cls.cfg.clone()
        cfg_b.defrost()
        cfg_b.MODEL.KD.SEED = 7
        trainer_b = cls.trainer_b = FixedBatchKDTrainer(cfg_b)
        trainer_b.resume_or_load(resume=True)
        cls.state_b = _state(trainer_b)
        trainer_b.train()

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_kd_losses_logged_and_student_trained(self):
        for key in ("loss_class", "loss_kd_cls_general", "loss_kd_giou_specific_0"):
            self.assertIn(key, _loss_values(self.trainer))
        self.assertIn("loss_kd_scale_general", _loss_values(self.trainer))
        before = self.student_before
        changed = [k for k, v in self.state_a["model"].items() if not torch.equal(v, before[k])]
        self.assertIn("transformer.decoder.layers.0.sa_qcontent_proj.weight", changed)

    def test_points_identical_in_teacher_and_student(self):
        self.assertEqual((len(self.teacher_calls), len(self.student_calls)), (3, 3))
        sampler = DistillationPointSampler(self.cfg)
        for it, (t_call, s_call) in enumerate(zip(self.teacher_calls, self.student_calls)):
            t_groups, t_out = t_call["args"][1], t_call["out"]
            s_groups, s_out = s_call["kwargs"]["extra_query_groups"], s_call["out"][1]
            general = t_groups[0]["boxes"]
            self.assertTrue(torch.equal(general, sampler.sample(it)))
            self.assertTrue(torch.equal(s_groups[1]["boxes"], general))
            # Specific points: the teacher's anchors; both models decode the same boxes.
            t_anchors = t_out["layers"]["reference_boxes"][0]
            self.assertTrue(torch.equal(s_groups[0]["boxes"], t_anchors))
            self.assertFalse(s_groups[0]["boxes"].requires_grad)
            s_refs = [g["reference_boxes"][0] for g in s_out["groups"]]
            self.assertTrue(torch.allclose(s_refs[0], t_anchors))
            self.assertTrue(torch.allclose(s_refs[1], t_out["groups"][0]["reference_boxes"][0]))
        first, second = (c["args"][1][0]["boxes"] for c in self.teacher_calls[:2])
        self.assertFalse(torch.equal(first, second))  # re-sampled every iteration

    def test_teacher_frozen_unchanged_and_without_gradient(self):
        teacher = self.trainer.teacher
        self.assertTrue(all(not c["training"] and not c["grad"] for c in self.teacher_calls))
        self.assertTrue(all(c["training"] and c["grad"] for c in self.student_calls))
        for name, value in teacher.model.state_dict().items():
            self.assertTrue(torch.equal(value, self.teacher_before[name]), name)
        for param in teacher.parameters():
            self.assertFalse(param.requires_grad)
            self.assertIsNone(param.grad)
        self.assertFalse(teacher.model.training)

    def test_teacher_absent_from_student_optimizer_and_checkpoint(self):
        teacher_ids = {id(p) for p in self.trainer.teacher.parameters()}
        student = list(self.trainer.model.parameters())
        trainable = {id(p) for p in student if p.requires_grad}
        kd_ids = {id(p) for p in self.trainer.kd_losses.parameters()}
        optimized = {id(p) for g in self.trainer.optimizer.param_groups for p in g["params"]}
        self.assertFalse(teacher_ids & ({id(p) for p in student} | optimized))
        self.assertEqual(optimized, trainable | kd_ids)
        plain_keys = set(build_model(tiny_cfg()).state_dict())
        self.assertEqual(set(self.state_a["model"]), plain_keys)
        checkpoint = torch.load(
            os.path.join(self.cfg.OUTPUT_DIR, "model_0000001.pth"), weights_only=False
        )
        self.assertEqual(set(checkpoint["model"]), plain_keys)  # --eval-only loads it as is
        self.assertEqual(set(checkpoint["kd_losses"]), {"1.log_scale"})

    def test_resume_restores_everything(self):
        a, b = self.state_a, self.state_b
        for name, value in a["model"].items():
            self.assertTrue(torch.equal(value, b["model"][name]), name)
        self.assertEqual(b["trainer"]["iteration"], 1)
        self.assertEqual(self.trainer_b.start_iter, 2)
        optimizer_a = a["trainer"]["_trainer"]["optimizer"]  # Trainer saves it also on d2 v0.6
        _assert_same(self, b["trainer"]["_trainer"]["optimizer"], optimizer_a, "optimizer")
        self.assertGreater(len(optimizer_a["state"]), 0)
        _assert_same(self, b["scheduler"], a["scheduler"], "scheduler")
        self.assertEqual(a["scheduler"]["last_epoch"], 2)
        _assert_same(self, b["trainer"]["hooks"], a["trainer"]["hooks"], "hooks")
        self.assertEqual(b["trainer"]["hooks"]["DistillationPointsHook"]["sampler"]["seed"], 0)
        self.assertEqual(b["trainer"]["hooks"]["KDWeightSchedule"]["start_iter"], 0)
        self.assertNotEqual(a["kd_losses"]["1.log_scale"].item(), 0.0)  # learned
        self.assertTrue(torch.equal(b["kd_losses"]["1.log_scale"], a["kd_losses"]["1.log_scale"]))
        # The next step on the same batch: same losses (KD weight 3/4 of the warm-up) and weights.
        self.assertEqual(self.trainer.storage.latest()["kd_weight"][0], 0.75)
        self.assertEqual(self.trainer_b.storage.latest()["kd_weight"][0], 0.75)
        losses_a, losses_b = _loss_values(self.trainer), _loss_values(self.trainer_b)
        self.assertEqual(losses_a.keys(), losses_b.keys())
        for key, value in losses_a.items():
            self.assertAlmostEqual(value, losses_b[key], places=6, msg=key)
        params_b = dict(self.trainer_b.model.named_parameters())
        for name, param in self.trainer.model.named_parameters():
            torch.testing.assert_close(param, params_b[name], rtol=1e-6, atol=1e-7, msg=name)

    def test_teacher_runs_under_the_students_autocast(self):
        inner, batch = self.trainer._trainer, synthetic_batch(2)
        for enabled in (False, True):
            t_calls, s_calls = [], []
            with spy(inner.teacher.model, "forward_raw", t_calls), spy(
                inner.model, "forward", s_calls
            ), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                losses = inner.compute_losses(batch)
            self.assertEqual([c["autocast"] for c in t_calls + s_calls], [enabled] * 2)
            self.assertFalse(t_calls[0]["grad"])
            self.assertTrue(all(torch.isfinite(v) for v in losses.values()))

    def test_kd_weight_scales_only_the_kd_losses(self):
        inner, batch = self.trainer._trainer, synthetic_batch(2)
        saved = inner.kd_weight  # the schedule's last value
        try:
            inner.kd_weight = 1.0
            full = inner.compute_losses(batch)
            inner.kd_weight = 0.25
            scaled = inner.compute_losses(batch)
        finally:
            inner.kd_weight = saved
        for key, value in full.items():
            factor = 0.25 if key.startswith("loss_kd_") else 1.0
            torch.testing.assert_close(scaled[key], factor * value, msg=key)
        schedule = KDWeightSchedule(factor=2.0, warmup_iters=4)
        schedule.start_iter = 10
        self.assertEqual([schedule.value(i) for i in (10, 11, 13, 20)], [0.5, 1.0, 2.0, 2.0])
        self.assertEqual(KDWeightSchedule(factor=3.0).value(0), 3.0)


@unittest.skipIf(not torch.cuda.is_available(), "AMP training needs CUDA")
class TestKDAMP(unittest.TestCase):
    def test_amp_kd_steps_run_the_teacher_under_autocast(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            opts = ["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True"]
            trainer = FixedBatchKDTrainer(kd_cfg(tmp, weights, *opts))
            self.assertIsInstance(trainer._trainer, KDAMPTrainer)
            trainer.resume_or_load(resume=False)
            calls = []
            with spy(trainer.teacher.model, "forward_raw", calls):
                trainer.train()
        self.assertEqual([(c["autocast_cuda"], c["grad"]) for c in calls], [(True, False)] * 2)
        losses = torch.tensor(list(_loss_values(trainer).values()))
        self.assertTrue(torch.isfinite(losses).all())
        self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))


class TestBaselines(unittest.TestCase):
    def test_baseline_point_modes(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            for mode in ("inconsistent", "similar_foreground", "similar_general"):
                cfg = kd_cfg(tmp, weights, "MODEL.KD.POINTS", mode)
                trainer = FixedBatchKDTrainer(cfg)
                self.assertEqual(trainer.pairing.name, mode)
                inner = trainer._trainer
                self.assertIsInstance(inner, KDSimpleTrainer)
                losses = inner.compute_losses(synthetic_batch(2))
                for key in (f"loss_kd_cls_{mode}", f"loss_kd_giou_{mode}_0", "loss_giou"):
                    self.assertIn(key, losses)
                    self.assertTrue(torch.isfinite(losses[key]))
                sum(losses.values()).backward()
                self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))
                grad = trainer.model.class_embed.weight.grad
                self.assertTrue(grad is not None and grad.abs().sum() > 0)


def _one_step(cfg, out_file):
    """Train one KD iteration with cfg; rank 0 saves the logged losses and the gradients."""
    torch.manual_seed(0)
    trainer = FixedBatchKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model
    teacher_ids = {id(p) for p in trainer.teacher.parameters()}
    result = {
        "losses": _loss_values(trainer) if comm.is_main_process() else {},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "kd_grad": trainer.kd_losses[1].log_scale.grad.clone(),
        "ddp": isinstance(model, DistributedDataParallel),
        "find_unused": getattr(model, "find_unused_parameters", None),
        "teacher_in_ddp": any(id(p) in teacher_ids for p in model.parameters()),
        "world": comm.get_world_size(),
    }
    torch.save(result, out_file.format(rank=comm.get_rank()))


def _ddp_worker(cfg, out_file):
    torch.set_num_threads(1)
    _one_step(cfg, out_file)


@pytest.mark.slow
class TestTwoProcesses(unittest.TestCase):
    def test_two_cpu_processes_equal_one_with_the_total_batch(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            opts = [*LOSSES, "MODEL.KD.MODE", "normalized", "SOLVER.IMS_PER_BATCH", "4"]
            opts += ["SOLVER.MAX_ITER", "1"]
            one = kd_cfg(os.path.join(tmp, "one"), weights, *opts)
            _one_step(one, os.path.join(tmp, "one_{rank}.pt"))
            two = kd_cfg(os.path.join(tmp, "two"), weights, *opts)
            launch(_ddp_worker, 2, dist_url="auto", args=(two, os.path.join(tmp, "two_{rank}.pt")))
            ref = torch.load(os.path.join(tmp, "one_0.pt"), weights_only=False)
            ranks = [
                torch.load(os.path.join(tmp, f"two_{r}.pt"), weights_only=False) for r in (0, 1)
            ]
        self.assertEqual((ref["world"], ref["ddp"]), (1, False))
        for result in ranks:
            self.assertEqual(result["world"], 2)
            self.assertTrue(result["ddp"])
            self.assertIs(result["find_unused"], False)
            self.assertFalse(result["teacher_in_ddp"])
            self.assertEqual(result["grads"].keys(), {f"module.{k}" for k in ref["grads"]})
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(
                    result["grads"][f"module.{name}"], grad, rtol=1e-5, atol=1e-5, msg=name
                )
            torch.testing.assert_close(result["kd_grad"], ref["kd_grad"], rtol=1e-5, atol=1e-5)
        # Logged losses are the ranks' mean: equal to one process in "normalized" mode.
        self.assertEqual(ranks[0]["losses"].keys(), ref["losses"].keys())
        for key, value in ref["losses"].items():
            self.assertAlmostEqual(ranks[0]["losses"][key], value, delta=1e-5 * max(1, value))


class TestKDTrainNet(unittest.TestCase):
    """train_net.py distils with the demo KD recipe; --eval-only evaluates the plain student."""

    def test_demo_recipe_trains_and_eval_only_uses_the_student(self):
        config = os.path.join(REPO_ROOT, "configs", "kd_detr")
        config = os.path.join(config, "kd_dab_detr_efflite0_from_efflite2_demo.yaml")
        with tempfile.TemporaryDirectory() as tmp:
            teacher_cfg = os.path.join(REPO_ROOT, "configs", "demo", "dab_detr_efflite2_demo.yaml")
            tiny = tiny_demo_opts(os.path.join(tmp, "data"), size=64)
            tiny += ["MODEL.KD.GENERAL.NUM_POINTS", "10"]
            args = default_argument_parser().parse_args(
                ["--config-file", teacher_cfg, "OUTPUT_DIR", os.path.join(tmp, "t"), *tiny]
            )
            teacher = build_model(train_net.setup(args))
            DetectionCheckpointer(teacher, save_dir=tmp).save("teacher")
            out = os.path.join(tmp, "kd")
            weights = ["MODEL.KD.TEACHER.WEIGHTS", os.path.join(tmp, "teacher.pth")]
            args = default_argument_parser().parse_args(
                ["--config-file", config, "OUTPUT_DIR", out, *weights, *tiny]
            )
            trained = train_net.main(args)
            self.assertIn("bbox", trained)
            student = os.path.join(out, "model_final.pth")
            args = default_argument_parser().parse_args(
                ["--config-file", config, "--eval-only", "MODEL.WEIGHTS", student, *tiny]
                + ["OUTPUT_DIR", os.path.join(tmp, "eval"), "MODEL.KD.TEACHER.WEIGHTS", "none"]
            )
            evaluated = train_net.main(args)  # no teacher is built (its weights do not exist)
            for key, value in trained["bbox"].items():
                if value == value:  # NaN for classes absent from the tiny split
                    self.assertAlmostEqual(evaluated["bbox"][key], value, places=6, msg=key)
            # The very same detections: the distilled student's checkpoint was evaluated.
            results = os.path.join("inference", "kd_demo_val", "coco_instances_results.json")
            detections = [json.load(open(os.path.join(tmp, d, results))) for d in ("kd", "eval")]
            self.assertGreater(len(detections[0]), 0)
            self.assertEqual(detections[0], detections[1])


if __name__ == "__main__":
    unittest.main()
