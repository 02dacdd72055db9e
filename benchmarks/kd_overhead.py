#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""What a KD-DETR training step costs over training the student alone.

Setting (issue 5): DAB-DETR R50 teacher -> DAB-DETR R18 student (random weights), batch 2 images
of 512 x 512 with 3 ground-truth boxes each, Mg = 300 general points + the teacher's 300 anchors
(600 distillation queries), AdamW. Every configuration runs in its own subprocess; time = median
step time after warm-up steps; peak memory = peak RSS growth over the RSS after imports.

Configurations:
- ``student``: one training step of the student alone (forward, losses, backward, optimizer).
- ``kd_masked`` / ``kd_separate``: the KD step (KDSimpleTrainer.run_step: teacher forward with
  the points, one student forward/backward with the points as extra query groups, KD losses),
  point groups decoded in one masked pass or in separate decoder passes (the official way).
- ``teacher_points``: the teacher's forward (no grad) over its 300 queries + 300 general points.
- ``student_points``: the student decoder's forward + backward over the 600 point queries alone
  (on a fixed encoder output), the cheaper of one masked pass and two separate passes.

Printed on their own lines:
  time_ratio   = KD step (the faster mode) / student step
  bound_ratio  = (student step + teacher_points + student_points) / student step: what the
                 method cannot avoid; time_ratio / bound_ratio <= 1.10 is the goal
  memory_ratio = KD peak RSS growth / student peak RSS growth (goal <= 1.5)

``--group-checkpoint`` turns on ``MODEL.DETR.GROUP_CHECKPOINT`` for the student: the point
groups' decoder activations are recomputed in the backward pass instead of kept.
``--losses NAME [NAME ...]`` sets ``MODEL.KD.LOSSES`` of the KD configurations (default: the
recipe's, KD-DETR's point terms), e.g. ``--losses KDDETRLoss FGDLoss``; the terms are bound to
both models and their parameters (adapters, generation blocks) optimised, as in the KD trainer.
A term's own keys keep their defaults (FGD / MGD / KDEP distil "res5"); ``--opts KEY VALUE ...``
merges further keys into the KD configurations, e.g. ``--losses DETRDistillLoss --opts
MODEL.KD.GENERAL.ENABLED False`` (DETRDistill's query-prior group is the teacher's queries alone).

Usage: python benchmarks/kd_overhead.py [--steps 5] [--warmup 2] [--threads N] [--size 512]
           [--group-checkpoint] [--losses NAME [NAME ...]] [--opts KEY VALUE ...]
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD_CONFIG = "configs/kd_detr/kd_dab_detr_R_18_from_R_50_50ep_coco.yaml"
CONFIGS = ("student", "kd_masked", "kd_separate", "teacher_points", "student_points")


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_cfg(
    teacher_weights, group_decoding, num_points=300, group_checkpoint=False, losses=None,
    opts=(), kd_config=KD_CONFIG,
):
    from kd_detr.config import load_config

    no_pretrained = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    cfg = load_config(os.path.join(ROOT, kd_config), freeze=False)
    cfg.merge_from_list(
        no_pretrained
        + [
            "MODEL.DETR.GROUP_DECODING", group_decoding,
            "MODEL.KD.TEACHER.CONFIG_FILE", os.path.join(ROOT, cfg.MODEL.KD.TEACHER.CONFIG_FILE),
            "MODEL.KD.TEACHER.WEIGHTS", teacher_weights,
            "MODEL.KD.GENERAL.NUM_POINTS", str(num_points),
            "SOLVER.IMS_PER_BATCH", "2",
            "MODEL.DETR.GROUP_CHECKPOINT", str(group_checkpoint),
        ]
    )  # fmt: skip
    cfg.MODEL.KD.TEACHER.OPTS = no_pretrained + ["MODEL.DETR.GROUP_DECODING", group_decoding]
    if losses:
        cfg.MODEL.KD.LOSSES = list(losses)
    cfg.merge_from_list(list(opts))
    return cfg


def batch(size, num_images=2, boxes=3, seed=0):
    import torch

    from detectron2.structures import Boxes, Instances

    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(num_images):
        inst = Instances((size, size))
        xy = torch.rand(boxes, 2, generator=gen) * size * 0.6
        wh = torch.rand(boxes, 2, generator=gen) * size * 0.3 + size * 0.05
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 80, (boxes,), generator=gen)
        image = torch.rand(3, size, size, generator=gen) * 255
        data.append({"image": image, "instances": inst, "height": size, "width": size})
    return data


def save_teacher(path):
    """A randomly initialised teacher checkpoint (the KD step's cost does not depend on it)."""
    import torch

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from kd_detr.config import load_config

    cfg = load_config(
        os.path.join(ROOT, "configs/dab_detr/dab_detr_R_50_50ep_coco.yaml"),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(
        os.path.basename(path)[: -len(".pth")]
    )


def bound_kd_losses(cfg, student, teacher, optimizer):
    """The KD terms of ``cfg`` bound to both models, their parameters in an optimizer group (lr
    SOLVER.BASE_LR, no weight decay), as KDTrainer does."""
    from kd_detr.distill import build_kd_losses

    kd_losses = build_kd_losses(cfg)
    for term in kd_losses:
        term.bind(student, teacher.model)
    kd_losses.to(teacher.device)
    params = [p for p in kd_losses.parameters() if p.requires_grad]
    if params:
        optimizer.add_param_group({"params": params, "lr": cfg.SOLVER.BASE_LR, "weight_decay": 0.0})
    return kd_losses


def timed(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def worker(name, args):
    import torch

    torch.set_num_threads(args.threads)
    baseline = rss_mib()  # after the imports (kd_detr, with its models, at the top)
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from kd_detr.distill import build_pairing
    from kd_detr.distill.points import DistillationPointSampler, specific_points
    from kd_detr.distill.teacher import build_teacher
    from kd_detr.engine.kd_trainer import KDSimpleTrainer
    from kd_detr.engine.optimizer import build_optimizer

    extra = {}
    decoding = "separate" if name == "kd_separate" else "masked"
    cfg = build_cfg(
        args.teacher_weights, decoding, group_checkpoint=args.group_checkpoint, losses=args.losses,
        opts=args.opts, kd_config=args.kd_config,
    )
    data = batch(args.size)
    torch.manual_seed(0)
    student = build_model(cfg)
    student.train()
    optimizer = build_optimizer(cfg, student)
    loader = iter(lambda: data, None)

    if name == "student":
        trainer = SimpleTrainer(student, loader, optimizer)
    elif name in ("kd_masked", "kd_separate"):
        teacher = build_teacher(cfg)
        kd_losses = bound_kd_losses(cfg, student, teacher, optimizer)
        trainer = KDSimpleTrainer(
            student,
            loader,
            optimizer,
            teacher=teacher,
            kd_losses=kd_losses,
            pairing=build_pairing(cfg, student=student, teacher=teacher),
        )
    if name in ("student", "kd_masked", "kd_separate"):
        trainer.iter = 0

        def step():
            trainer.run_step()
            trainer.iter += 1

        with EventStorage(0):
            median, times = timed(step, args.steps, args.warmup)
    elif name == "teacher_points":
        teacher = build_teacher(cfg)
        sampler = DistillationPointSampler(cfg)
        general = sampler.group(0)
        median, times = timed(lambda: teacher(data, [general]), args.steps, args.warmup)
        extra["teacher_weights_mib"] = (
            sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
        )
    elif name == "student_points":
        teacher = build_teacher(cfg)
        sampler = DistillationPointSampler(cfg)
        general = sampler.group(0)
        with torch.no_grad():
            t_out = teacher(data, [general])
            encoded = student.encode(student.preprocess_image(data))
        d_s = student.transformer.d_model
        specific = specific_points(t_out, d_s, teacher.query_content(len(data)))
        groups = student._parse_groups([specific, general], len(data))
        memory = encoded["memory"].detach().requires_grad_(True)
        inputs = dict(encoded, memory=memory)

        def decode_points(mode):
            def run():
                student.zero_grad(set_to_none=True)
                student.group_decoding = mode
                loss = 0
                for hs, refs in student.decode(inputs, groups):
                    logits, boxes = student.predict(hs, refs)
                    loss = loss + logits.float().mean() + boxes.float().mean()
                loss.backward()

            return run

        masked = timed(decode_points("masked"), args.steps, args.warmup)
        separate = timed(decode_points("separate"), args.steps, args.warmup)
        median, times = min(masked, separate)
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")
    return {
        "name": name,
        "median_s": median,
        "times_s": times,
        "peak_rss_growth_mib": peak_rss_mib() - baseline,
        "threads": torch.get_num_threads(),
        **extra,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--json", default="", help="also write all measurements here")
    parser.add_argument(
        "--group-checkpoint", action="store_true", help="MODEL.DETR.GROUP_CHECKPOINT True"
    )
    parser.add_argument(
        "--losses", nargs="+", metavar="NAME", default=None,
        help="MODEL.KD.LOSSES of the KD configurations (default: the recipe's)",
    )  # fmt: skip
    parser.add_argument(
        "--opts", nargs="+", metavar="KEY VALUE", default=[],
        help="further config keys of the KD configurations, e.g. MODEL.KD.GENERAL.ENABLED False",
    )  # fmt: skip
    parser.add_argument(
        "--kd-config", default=KD_CONFIG,
        help="KD recipe of the KD configurations (a DAB-DETR R50 -> R18 recipe, e.g. one of "
        "configs/kd_zoo/*_dab_detr_R_18_from_R_50_50ep_coco.yaml)",
    )  # fmt: skip
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--teacher-weights", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_worker(name, args, teacher_weights):
    """Measure configuration ``name`` in its own process (the options of ``args``: steps,
    warmup, threads, size, group_checkpoint, losses, opts, kd_config); its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
           "--teacher-weights", teacher_weights, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--size", str(args.size), "--kd-config", args.kd_config]  # fmt: skip
    cmd += ["--group-checkpoint"] if args.group_checkpoint else []
    cmd += ["--losses", *args.losses] if args.losses else []
    cmd += ["--opts", *args.opts] if args.opts else []
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"configuration {name} failed (exit code {out.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "teacher_R50.pth")
        save_teacher(weights)
        for name in CONFIGS:
            results[name] = run_worker(name, args, weights)
            r = results[name]
            print(
                f"{name:15s} median {r['median_s']:.3f} s/step  "
                f"peak RSS growth {r['peak_rss_growth_mib']:.0f} MiB",
                flush=True,
            )
    student = results["student"]["median_s"]
    kd_name = min(("kd_masked", "kd_separate"), key=lambda n: results[n]["median_s"])
    kd = results[kd_name]["median_s"]
    bound = student + results["teacher_points"]["median_s"] + results["student_points"]["median_s"]
    summary = {
        "kd_mode": kd_name,
        "kd_losses": args.losses or "recipe",
        "time_ratio": kd / student,
        "bound_ratio": bound / student,
        "memory_ratio": results[kd_name]["peak_rss_growth_mib"]
        / results["student"]["peak_rss_growth_mib"],
        "separate_over_masked": results["kd_separate"]["median_s"]
        / results["kd_masked"]["median_s"],
    }
    summary["time_over_bound"] = summary["time_ratio"] / summary["bound_ratio"]
    teacher_mib = results["teacher_points"]["teacher_weights_mib"]
    summary["teacher_weights_mib"] = teacher_mib
    summary["memory_ratio_without_teacher_weights"] = (
        results[kd_name]["peak_rss_growth_mib"] - teacher_mib
    ) / results["student"]["peak_rss_growth_mib"]
    print(f"KD losses: {summary['kd_losses']}")
    print(f"faster KD mode: {kd_name} (separate / masked = {summary['separate_over_masked']:.2f})")
    print(f"time_ratio={summary['time_ratio']:.3f}")
    print(f"bound_ratio={summary['bound_ratio']:.3f}")
    print(f"memory_ratio={summary['memory_ratio']:.3f}")
    print(f"time_ratio/bound_ratio={summary['time_over_bound']:.3f} (goal <= 1.10)")
    print(
        f"teacher weights {teacher_mib:.0f} MiB; memory ratio without them "
        f"{summary['memory_ratio_without_teacher_weights']:.3f} (memory goal <= 1.5)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
