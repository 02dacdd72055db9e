# Copyright (c) kd_detr contributors.
"""Convert a torchvision/timm ImageNet ResNet checkpoint to Detectron2 ResNet backbone weights.

Usage::

    python tools/convert_resnet_to_d2.py resnet18-f37072fd.pth R-18-torchvision.pkl
    python tools/convert_resnet_to_d2.py resnet50.pth R-50.pkl --prefix backbone.bottom_up.

Then set ``MODEL.WEIGHTS`` to the output, merge ``configs/Base-ResNet-torchvision.yaml`` (RGB,
torchvision mean/std, STRIDE_IN_1X1 False) and set MODEL.RESNETS.DEPTH (printed below; also
RES2_OUT_CHANNELS 64 for depth 18/34). ``--prefix`` (default "backbone.") must match where the
ResNet sits: "backbone." for ``build_resnet_backbone`` under a meta-arch, "backbone.bottom_up."
for ``build_resnet_fpn_backbone``, "" for the bare backbone. A ``.pkl`` output is written in
Detectron2's model-zoo format with ``matching_heuristics: False`` so names must match exactly.
"""
import argparse
import sys

from kd_detr.modeling.backbone.resnet import (
    convert_torchvision_resnet,
    infer_resnet_depth,
    load_resnet_state_dict,
    save_detectron2_checkpoint,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="torchvision/timm ResNet state dict (.pth, .safetensors)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl or .pth)")
    parser.add_argument(
        "--prefix",
        default="backbone.",
        help='key prefix: "backbone." (default), "backbone.bottom_up." (FPN) or "" (bare ResNet)',
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        state_dict = load_resnet_state_dict(args.input)
        converted = convert_torchvision_resnet(state_dict, prefix=args.prefix)
        save_detectron2_checkpoint(converted, args.output)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prefix = args.prefix + ("." if args.prefix and not args.prefix.endswith(".") else "")
    print(f"Wrote {len(converted)} tensors to {args.output} (key prefix {prefix!r}).")
    try:
        depth = infer_resnet_depth(state_dict)
    except ValueError as e:
        print(f"Could not infer MODEL.RESNETS.DEPTH: {e}")
    else:
        res2 = " RES2_OUT_CHANNELS 64" if depth in (18, 34) else ""
        print(f"Use MODEL.RESNETS.DEPTH {depth}{res2} STRIDE_IN_1X1 False, INPUT.FORMAT RGB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
