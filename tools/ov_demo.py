#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Open-vocabulary detection demo: a trained model, images and a vocabulary of class names ->
the images with labelled boxes (Detectron2's Visualizer).

    python tools/ov_demo.py --config-file configs/ov/ov_dab_detr_efflite0_coco128_ovd.yaml \\
        --weights output/ov_dab_detr_coco128/model_final.pth --input img1.jpg img2.jpg \\
        --vocabulary "cat,dog,umbrella" --clip-model ViT-B-32 --clip-pretrained openai \\
        --output demo_out/
    # ViLD (Faster R-CNN with ViLDROIHeads) models work the same way:
    python tools/ov_demo.py --config-file configs/ov/vild_efflite0_fpn_coco128_ovd.yaml \\
        --weights output/vild_coco128/model_final.pth --input img1.jpg --vocabulary "cat,dog" ...
    # or precomputed embeddings (rows named by their JSON sidecar), optionally a subset of them:
    python tools/ov_demo.py ... --text-embeddings my_classes.npy [--vocabulary "cat,dog"]

The vocabulary replaces the one the model was trained with (checkpoints store none) in the
DETR-family class head (MODEL.DETR.CLASS_HEAD region_text) or in the ViLD box predictor's
classifier; its text embeddings must come from the CLIP text encoder the model was trained with
(same size). For ViLD models --confidence-threshold is also the ROI heads' test score threshold.
Config overrides go last: --opts KEY VALUE ...
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import logging
import os
import socket
import sys
import tempfile
from typing import Dict, List

import numpy as np
import torch

from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

from kd_detr.config import load_config
from kd_detr.ov.text_embeddings import PROMPT_TEMPLATES, encode_class_names, load_text_embeddings
from kd_detr.ov.vocabulary import embedding_row_names, select_vocabulary

logger = logging.getLogger("kd_detr.ov_demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="the model's config")
    p.add_argument("--weights", required=True, help="trained checkpoint (.pth)")
    p.add_argument("--input", required=True, nargs="+", help="image files")
    p.add_argument("--vocabulary", default="", help="comma-separated class names")
    p.add_argument("--text-embeddings", default="", help=".npy (+ JSON sidecar) of the classes")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag or file")
    p.add_argument("--clip-model-config", default="", help="extra open_clip model config json")
    p.add_argument("--templates", default="single", choices=sorted(PROMPT_TEMPLATES))
    p.add_argument("--output", required=True, help="output folder for the drawn images")
    p.add_argument("--confidence-threshold", type=float, default=0.3)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return p.parse_args(argv)


def _names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"--vocabulary lists a class twice: {names}")
    return names


def resolve_vocabulary(args):
    """(class names, (C, D) unit-norm text embeddings) from the command line."""
    names = _names(args.vocabulary)
    if args.text_embeddings:
        emb = load_text_embeddings(args.text_embeddings)
        rows = embedding_row_names(args.text_embeddings, len(emb))
        if not names:
            return rows, emb
        return names, select_vocabulary(emb, rows, names, source=args.text_embeddings)
    if not names:
        raise ValueError("Give --vocabulary 'name1,name2,...' and/or --text-embeddings FILE.npy")
    import open_clip

    if args.clip_model_config:
        open_clip.add_model_config(args.clip_model_config)
    model = _create_clip_model(open_clip, args.clip_model, args.clip_pretrained)
    tokenizer = open_clip.get_tokenizer(args.clip_model)
    emb = encode_class_names(
        model.eval(), tokenizer, [[n] for n in names], PROMPT_TEMPLATES[args.templates]
    )
    return names, emb


def _hub_unreachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        return True


def _create_clip_model(open_clip, name: str, pretrained: str):
    """``open_clip.create_model``; without a network, only cached weights are tried (instead of
    retrying the hub for a minute) and a missing file says how to pass the embeddings instead."""
    remote = pretrained and not os.path.isfile(pretrained)
    if remote and _hub_unreachable():
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True  # cache only, fail at once
    try:
        return open_clip.create_model(name, pretrained=pretrained or None)
    except Exception as e:
        if not remote:
            raise
        raise SystemExit(
            f"Cannot load the CLIP weights {name} / {pretrained!r} ({type(e).__name__}: "
            f"{str(e)[:200]}): they are not cached here and the hub cannot be reached. Pass the "
            "class text embeddings instead: --text-embeddings FILE.npy (made with "
            "tools/build_text_embeddings.py where the weights exist), or --clip-pretrained "
            "path/to/weights.bin."
        ) from e


def _vocabulary_overrides(cfg, args, num_classes: int) -> List[str]:
    """Config overrides that make the demo vocabulary the class head's only vocabulary."""
    if cfg.MODEL.DETR.CLASS_HEAD == "region_text":
        return [
            "MODEL.OV.DETR_HEAD.VOCABULARY_FROM_DATASETS", "False",
            "MODEL.DETR.NUM_CLASSES", str(num_classes),
        ]  # fmt: skip
    if cfg.MODEL.ROI_HEADS.NAME == "ViLDROIHeads":
        # training-only parts off: no region cache and no RegionCLIP concept file are needed
        return [
            "MODEL.OV.VILD.VOCABULARY_FROM_DATASETS", "False",
            "MODEL.OV.VILD.IMAGE_LOSS_WEIGHT", "0.0",
            "MODEL.OV.REGIONCLIP.CONTRASTIVE_WEIGHT", "0.0",
            "MODEL.OV.REGIONCLIP.DISTILL_WEIGHT", "0.0",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes),
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.confidence_threshold),
        ]  # fmt: skip
    raise ValueError(
        f"{args.config_file} is not an open-vocabulary model: MODEL.DETR.CLASS_HEAD is not "
        "'region_text' "
        f"and MODEL.ROI_HEADS.NAME is {cfg.MODEL.ROI_HEADS.NAME!r}, not 'ViLDROIHeads'; use a "
        "config from configs/ov/"
    )


def setup_cfg(args, embeddings_file: str, num_classes: int):
    """The model's config with the demo vocabulary as its only (train and test) vocabulary."""
    cfg = load_config(args.config_file, args.opts, freeze=False)
    cfg.merge_from_list(
        _vocabulary_overrides(cfg, args, num_classes)
        + [
            "MODEL.OV.TEXT_EMBEDDINGS", embeddings_file,
            "MODEL.OV.TEST_TEXT_EMBEDDINGS", "",
            "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
            "MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", args.device,
        ]
    )  # fmt: skip
    cfg.freeze()
    return cfg


def main(argv=None) -> List[Dict]:
    """Run the demo; returns per image {"input", "output", "instances"} (kept detections)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    names, emb = resolve_vocabulary(args)
    probe = load_config(args.config_file, args.opts)
    if emb.shape[1] != probe.MODEL.OV.EMBED_DIM:
        raise ValueError(
            f"The vocabulary's text embeddings have size {emb.shape[1]} but the model was built "
            f"for size {probe.MODEL.OV.EMBED_DIM} (MODEL.OV.EMBED_DIM): encode the names with the "
            "CLIP text encoder the model was trained with (--clip-model / --clip-pretrained)"
        )
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights not found: {args.weights}")
    with tempfile.TemporaryDirectory(prefix="kd_ov_demo_") as tmp:
        path = os.path.join(tmp, "vocabulary.npy")
        np.save(path, emb.numpy().astype(np.float32))
        cfg = setup_cfg(args, path, len(names))
        predictor = DefaultPredictor(cfg)
    metadata = Metadata(name="kd_detr_ov_demo")
    metadata.set(thing_classes=list(names))
    os.makedirs(args.output, exist_ok=True)
    results = []
    for image_path in args.input:
        image = read_image(image_path, format="BGR")
        with torch.no_grad():
            instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= args.confidence_threshold]
        drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        stem = os.path.splitext(os.path.basename(image_path))[0]
        out = os.path.join(args.output, f"{stem}.png")
        drawn.save(out)
        logger.info(f"{image_path}: {len(instances)} detections -> {out}")
        results.append({"input": image_path, "output": out, "instances": instances})
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
