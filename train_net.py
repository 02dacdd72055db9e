#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Train or evaluate a kd_detr model (Detectron2's four-part train_net.py).

    python train_net.py --config-file configs/demo/faster_rcnn_efflite0_fpn_demo.yaml
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CFG --num-gpus 2   # also on CPU: gloo processes
    python train_net.py --config-file configs/kd_detr/RECIPE.yaml MODEL.KD.TEACHER.WEIGHTS T.pth
"""
import time

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm

from kd_detr.config import load_config
from kd_detr.engine import (
    KDTrainer,
    Trainer,
    launch,
    load_for_evaluation,
    preflight_check,
    write_metrics_json,
)
from kd_detr.modeling.num_classes import check_num_classes


def setup(args):
    """Build the frozen config (Detectron2 defaults + kd_detr keys + file + command line, its
    datasets registered), check the model's class count against the training data and the run's
    inputs (``preflight_check``: solver, OUTPUT_DIR, dataset and evaluator names, image files)."""
    cfg = load_config(args.config_file, args.opts)
    check_num_classes(cfg, test=True)
    preflight_check(cfg, eval_only=args.eval_only)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_for_evaluation(cfg, model, resume=args.resume)
        results = Trainer.test(cfg, model)
        write_metrics_json(cfg, results, {"mode": "eval_only", "weights": cfg.MODEL.WEIGHTS})
        return results

    # MODEL.KD.ENABLED: distil the frozen MODEL.KD.TEACHER into the model; --eval-only above
    # evaluates the plain student either way.
    trainer = (KDTrainer if cfg.MODEL.KD.ENABLED else Trainer)(cfg)
    trainer.resume_or_load(resume=args.resume)
    start = time.perf_counter()
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    extra = {
        "mode": "train",
        "max_iter": cfg.SOLVER.MAX_ITER,
        "train_and_eval_seconds": round(time.perf_counter() - start, 1),
        "world_size": comm.get_world_size(),
    }
    write_metrics_json(cfg, results, extra)
    return results


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
