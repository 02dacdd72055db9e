#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Precompute ViLD-image targets: CLIP image embeddings of the top proposals of every image.

Examples:
    # proposals from a Detectron2 proposals .pkl or a COCO-style .json, images of a dataset
    python tools/precompute_clip_regions.py --config-file configs/ov/vild_R_50_FPN_coco_ovd.yaml \\
        --proposals proposals_coco_ovd_train.pkl --model ViT-B-32 --pretrained openai
    # proposals from a trained (class-agnostic) RPN, images of a COCO json
    python tools/precompute_clip_regions.py --coco-json ann.json --image-root images/ \\
        --rpn-config rpn.yaml --rpn-weights rpn.pth --pretrained /path/to/ViT-B-32.pt

For each image the --num-proposals (ViLD: 300) highest-scoring proposals are cropped at 1x and
1.5x, resized to the CLIP input size and encoded; the two normalised embeddings are averaged and
normalised. Results go to <output-root>/<hash of proposal source, CLIP model and settings>/, one
.npz per image; a re-run skips the images already there. The folder is printed at the end: set
MODEL.OV.VILD.REGION_CACHE_DIR to it.
"""
import kd_detr  # noqa: F401  isort: skip  (first: it silences fvcore's import-time FutureWarning)

import argparse
import logging
import os
import shlex
import sys

import torch

from detectron2.data import DatasetCatalog

from kd_detr.config import load_config
from kd_detr.data import load_coco_json_checked
from kd_detr.ov.clip_regions import (
    CROP_SCALES,
    ClipRegionCache,
    embed_dim,
    file_identity,
    precompute_clip_regions,
)
from kd_detr.ov.region_proposals import RPNProposals, load_proposals_file

logger = logging.getLogger("precompute_clip_regions")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    images = p.add_argument_group("images (a dataset of --config-file, or a COCO json)")
    images.add_argument("--config-file", default="", help="kd_detr config registering datasets")
    images.add_argument("--dataset", default="", help="dataset name (default: DATASETS.TRAIN[0])")
    images.add_argument("--coco-json", default="", help="COCO-format json instead of a dataset")
    images.add_argument("--image-root", default="", help="image folder of --coco-json")
    props = p.add_argument_group("proposals (a file, or a trained RPN)")
    props.add_argument("--proposals", default="", help="Detectron2 .pkl or COCO-style .json")
    props.add_argument("--rpn-config", default="", help="config of a model with an RPN")
    props.add_argument("--rpn-weights", default="", help="weights of --rpn-config's model")
    props.add_argument("--num-proposals", type=int, default=300, help="M per image (ViLD: 300)")
    clip = p.add_argument_group("CLIP")
    clip.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    clip.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or file")
    clip.add_argument("--model-config", default="", help="extra open_clip model config json")
    clip.add_argument("--batch-size", type=int, default=64, help="crops per CLIP forward")
    clip.add_argument("--device", default="cpu")
    p.add_argument("--output-root", default="datasets/clip_regions", help="cache root folder")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides of --config-file")
    return p.parse_args(argv)


def _dataset_dicts(args):
    if args.coco_json:
        if not args.image_root:
            raise SystemExit("--coco-json needs --image-root")
        return load_coco_json_checked(args.coco_json, args.image_root), file_identity(
            args.coco_json
        )
    if not args.config_file:
        raise SystemExit("Give the images: --config-file [--dataset NAME], or --coco-json")
    cfg = load_config(args.config_file, args.opts)
    name = args.dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "")
    if name not in DatasetCatalog.list():
        raise SystemExit(f"Dataset {name!r} is not registered by {args.config_file}")
    return DatasetCatalog.get(name), {"dataset": name}


def _proposal_source(args):
    """(proposals_fn(record, image), key) of --proposals or --rpn-config."""
    if bool(args.proposals) == bool(args.rpn_config):
        raise SystemExit("Give exactly one proposal source: --proposals FILE or --rpn-config CFG")
    if args.proposals:
        by_image = load_proposals_file(args.proposals)

        def from_file(record, image):
            key = str(record["image_id"])
            if key not in by_image:
                raise SystemExit(f"{args.proposals} has no proposals for image id {key}")
            return by_image[key]

        return from_file, {"file": file_identity(args.proposals)}
    if not args.rpn_weights:
        raise SystemExit("--rpn-config needs --rpn-weights")
    cfg = load_config(args.rpn_config, ["MODEL.DEVICE", args.device])
    rpn = RPNProposals(cfg, args.rpn_weights)
    key = {"rpn_config": file_identity(args.rpn_config), "rpn": file_identity(args.rpn_weights)}
    return (lambda record, image: rpn(image)), key


def _clip_model(args):
    import open_clip

    if args.model_config:
        open_clip.add_model_config(args.model_config)
    model = open_clip.create_model(args.model, pretrained=args.pretrained or None)
    model = model.to(args.device).eval()
    weights = args.pretrained
    if weights and os.path.isfile(weights):
        weights = file_identity(weights)
    return model, {"name": args.model, "pretrained": weights, "embed_dim": embed_dim(model)}


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    records, images_key = _dataset_dicts(args)
    proposals_fn, proposals_key = _proposal_source(args)
    model, model_key = _clip_model(args)
    key = {
        "proposals": proposals_key,
        "model": model_key,
        "num_proposals": args.num_proposals,
        "scales": list(CROP_SCALES),
    }
    command = "python tools/precompute_clip_regions.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    cache = ClipRegionCache.create(args.output_root, key, command)
    with torch.no_grad():
        done = precompute_clip_regions(
            records,
            proposals_fn,
            model,
            cache,
            num_proposals=args.num_proposals,
            batch_size=args.batch_size,
            device=args.device,
        )
    logger.info(
        f"{done} images computed, {len(records) - done} already cached ({images_key}); set "
        f"MODEL.OV.VILD.REGION_CACHE_DIR {cache.directory}"
    )
    print(cache.directory)
    return cache.directory


if __name__ == "__main__":
    main()
