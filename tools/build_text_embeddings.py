#!/usr/bin/env python
# Copyright (c) kd_detr contributors.
"""Build class text embeddings (.npy + .json sidecar) with an open_clip text encoder.

Examples:
    python tools/build_text_embeddings.py --vocabulary coco --output coco_vitb32.npy
    python tools/build_text_embeddings.py --vocabulary lvis \\
        --cat-info ../shared/data/clip_text/lvis_v1_train_cat_info.json --synonyms \\
        --templates ensemble --output lvis_ens.npy
    python tools/build_text_embeddings.py --vocabulary names.txt --model RN50 \\
        --pretrained /path/to/RN50.pt --output custom.npy

Weights come from open_clip's ``pretrained`` argument: a tag (read from the user's cache, which
open_clip downloads into when online) or a local checkpoint file.
"""
import argparse
import logging
import os
import sys

from kd_detr.ov.text_embeddings import (
    PROMPT_TEMPLATES,
    build_text_embeddings,
    coco_class_names,
    lvis_class_names,
    read_names_file,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocabulary", required=True, help="'coco', 'lvis' or a text file of names")
    p.add_argument("--cat-info", default="", help="LVIS cat_info / LVIS json (--vocabulary lvis)")
    p.add_argument("--synonyms", action="store_true", help="LVIS: average over the synonyms too")
    p.add_argument(
        "--templates",
        default="single",
        help=f"{' or '.join(PROMPT_TEMPLATES)}, or a text file with one template ('{{}}') a line",
    )
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or file")
    p.add_argument("--model-config", default="", help="extra open_clip model config json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True, help="output .npy (a .json sidecar goes beside it)")
    return p.parse_args(argv)


def _templates(spec):
    if spec in PROMPT_TEMPLATES:
        return list(PROMPT_TEMPLATES[spec])
    if os.path.isfile(spec):
        with open(spec) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    raise SystemExit(f"--templates must be one of {list(PROMPT_TEMPLATES)} or a file: {spec!r}")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.model_config:
        import open_clip

        open_clip.add_model_config(args.model_config)
    if args.vocabulary == "coco":
        names = coco_class_names()
    elif args.vocabulary == "lvis":
        if not args.cat_info:
            raise SystemExit("--vocabulary lvis needs --cat-info (an LVIS cat_info or LVIS json)")
        names = lvis_class_names(args.cat_info, synonyms=args.synonyms)
    else:
        names = read_names_file(args.vocabulary)
    build_text_embeddings(
        names,
        args.output,
        model_name=args.model,
        pretrained=args.pretrained,
        templates=_templates(args.templates),
        device=args.device,
    )
    return args.output


if __name__ == "__main__":
    main(sys.argv[1:])
