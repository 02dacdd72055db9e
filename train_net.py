#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Train or evaluate a kd_detr model (Detectron2's four-part train_net.py).

    python train_net.py --config-file configs/demo/faster_rcnn_efflite0_fpn_demo.yaml
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CFG --num-gpus 2   # also on CPU: gloo processes
    python train_net.py --config-file configs/kd_detr/RECIPE.yaml MODEL.KD.TEACHER.WEIGHTS T.pth
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import logging
import sys
import time

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm

from kd_detr.config import UnknownConfigKeyError, load_config
from kd_detr.engine import (
    KDTrainer,
    Trainer,
    check_output_dir,
    launch,
    load_for_evaluation,
    preflight_check,
    write_metrics_json,
)
from kd_detr.engine.setup import (
    StartupError,
    check_batch_size,
    check_device,
    check_schedule,
    hold_kd_detr_logs,
    setup_kd_detr_logger,
    solver_as_run,
)
from kd_detr.modeling.num_classes import check_num_classes

logger = logging.getLogger("kd_detr.train_net")


def setup(args):
    """Build the frozen config (Detectron2 defaults + kd_detr keys + file + command line, its
    datasets registered), check the model's class count against the training (and test) data,
    the device and the batch size, and send kd_detr's log records to Detectron2's console and
    ``OUTPUT_DIR/log.txt``. ``main`` then checks the run's inputs (``preflight_check``: solver,
    OUTPUT_DIR, dataset and evaluator names, image files) before building anything."""
    with hold_kd_detr_logs() as held:
        cfg = load_config(args.config_file, args.opts)
        check_num_classes(cfg, test=True)
        check_device(cfg)
        if not args.eval_only:
            check_batch_size(cfg, comm.get_world_size())
            check_schedule(cfg, comm.get_world_size())
        check_output_dir(cfg)  # before default_setup writes its log and config there
    default_setup(cfg, args)
    setup_kd_detr_logger(held)
    return cfg


def main(args):
    cfg = setup(args)
    preflight_check(cfg, eval_only=args.eval_only)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_for_evaluation(cfg, model, resume=args.resume)
        results = Trainer.test(cfg, model)
        write_metrics_json(cfg, results, {"mode": "eval_only", "weights": cfg.MODEL.WEIGHTS})
        return results

    # MODEL.KD.ENABLED: distil the frozen MODEL.KD.TEACHER into the model; --eval-only above
    # evaluates the plain student either way.
    trainer = (KDTrainer if cfg.MODEL.KD.ENABLED else Trainer)(cfg)
    # trainer.cfg: after Detectron2's auto_scale_workers (SOLVER.REFERENCE_WORLD_SIZE).
    solver = solver_as_run(cfg, trainer.cfg)
    trainer.resume_or_load(resume=args.resume)
    start = time.perf_counter()
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    extra = {
        "mode": "train",
        "max_iter": trainer.cfg.SOLVER.MAX_ITER,  # as run
        "train_and_eval_seconds": round(time.perf_counter() - start, 1),
        "world_size": comm.get_world_size(),
        "solver": solver,  # configured and as-run batch, lr, max_iter, steps, warm-up
    }
    write_metrics_json(cfg, results, extra)
    return results


def check_before_launch(args):
    """The config checks of :func:`setup`, run in the launching process when it starts several
    workers, so that a config that cannot run stops with one line there too (not once per worker
    with a traceback). Log records are dropped: each worker's setup logs them again."""
    world_size = args.num_gpus * args.num_machines
    if world_size > 1:
        with hold_kd_detr_logs():
            cfg = load_config(args.config_file, args.opts)
            check_device(cfg)
            if not args.eval_only:
                check_batch_size(cfg, world_size)
                check_schedule(cfg, world_size)


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        check_before_launch(args)
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (StartupError, UnknownConfigKeyError, FileExistsError) as e:
        # A config that cannot run: one line naming the problem and the fix, no traceback.
        sys.exit(f"train_net.py: error: {e}")


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
