#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Convert a third-party detector checkpoint to kd_detr weights ({"model": state_dict} .pth).

    python tools/convert_checkpoint.py --source hf --config-file CFG HF_FOLDER OUTPUT.pth [KEY VAL]

``--source hf``: INPUT is a folder written by transformers' ``save_pretrained`` (config.json and
weights); its model type is read from config.json (supported: see kd_detr.checkpoint.HF_CONVERTERS).
The config describes the kd_detr model the weights are for: it is checked against the source
config, the model is built on the CPU and the converted keys and shapes must match it exactly.
Load the result with ``MODEL.WEIGHTS OUTPUT.pth``.

``--source detr`` / ``dab_detr`` / ``detrex``: INPUT is a .pth of facebookresearch/detr,
IDEA-Research/DAB-DETR (or DN-DETR's DN-DAB-DETR) or detrex (DETR, DAB-DETR, DN-DETR); the 91
COCO category-id slots of official heads become Detectron2's 80 classes (``--coco-classes``).

``--source deformable_detr``: INPUT is a .pth of fundamentalvision/Deformable-DETR (plain,
``--with_box_refine``, ``--two_stage``); set MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE / TWO_STAGE to
the checkpoint's variant (a mismatch is an error saying which). ``--source detrex`` with a
DeformableDETR config converts detrex ``projects/deformable_detr`` checkpoints.

``--source dino``: INPUT is a .pth of IDEA-Research/DINO (4-scale) for a DINO config
(configs/dino/); its shared heads, 91 COCO slots and 92-row denoising label embedding are mapped.
``--source detrex`` with a DINO config converts detrex ``projects/dino`` checkpoints, which train
one head per decoder layer: add MODEL.DETR.DINO.SHARE_HEADS False and detrex's position encoding
MODEL.DETR.POSITION_TEMPERATURE 10000.0 MODEL.DETR.DINO.POSITION_OFFSET -0.5.

``--source rt_detr``: INPUT is a .pth of lyuwenyu/RT-DETR (rtdetr_pytorch v1 or rtdetrv2_pytorch
v2, ResNet-vd backbone) for an RTDETR config of the same MODEL.RTDETR.VERSION; the EMA weights are
used when the file has them, else "model". Its 80 COCO classes are Detectron2's order already.
``--source d_fine``: the same for a .pth of Peterande/D-FINE (HGNetv2) and a DFINE config.

``--source kd_ema``: INPUT is a kd_detr training checkpoint of an EMA self-distillation run
(``MODEL.KD.TEACHER.EMA.ENABLED``); the output holds its EMA teacher, a model of the student's
config, to evaluate or export instead of the student.

OUTPUT is written atomically and an existing file is kept unless ``--overwrite`` is given.
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import logging
import os
import sys

from detectron2.modeling import build_model

from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, atomic_torch_save, check_state_dict_keys
from kd_detr.config import load_config

logger = logging.getLogger("kd_detr.convert_checkpoint")


def setup_cfg(config_file, opts):
    return load_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])


# Checkpoint source -> converter(input, frozen cfg, coco_classes) -> kd_detr state dict; other
# sources register with kd_detr.checkpoint.register_checkpoint_converter.
SOURCES = CHECKPOINT_CONVERTERS


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="checkpoint kind")
    parser.add_argument("--config-file", required=True, help="kd_detr config of the target model")
    parser.add_argument("input", help="source checkpoint (for hf: a save_pretrained folder)")
    parser.add_argument(
        "--coco-classes",
        default="auto",
        choices=("auto", "map", "keep"),
        help="official checkpoints' 91 COCO category-id slots: map them to Detectron2's 80 "
        "classes when the config has 80 (auto), always (map, else an error) or never (keep)",
    )
    parser.add_argument("output", help="output .pth, {'model': state_dict}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    import kd_detr.modeling.meta_arch  # noqa: F401  (registers the meta-architectures)

    if os.path.exists(args.output) and not args.overwrite:
        raise SystemExit(
            f"{args.output} exists: choose another output file or pass --overwrite to replace it"
        )
    cfg = setup_cfg(args.config_file, args.opts)
    state_dict = SOURCES[args.source](args.input, cfg, coco_classes=args.coco_classes)
    model = build_model(cfg)
    check_state_dict_keys(state_dict, model.state_dict())
    atomic_torch_save({"model": state_dict}, args.output)
    logger.info(f"Wrote {len(state_dict)} tensors to {args.output}")
    return args.output


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(0 if main() else 1)
