# Copyright (c) kd_detr contributors.
"""Convert torchvision/timm ImageNet ResNet weights for Detectron2's ``build_resnet_backbone``.

Detectron2's own ResNet (depth 18/34/50/101/152, FrozenBN, ``MODEL.BACKBONE.FREEZE_AT``) is used
as is; only the weights need renaming::

    conv1 / bn1                        -> stem.conv1 / stem.conv1.norm
    layerI.M.convK / bnK               -> res{I+1}.M.convK / res{I+1}.M.convK.norm
    layerI.M.downsample.0 / .1         -> res{I+1}.M.shortcut / res{I+1}.M.shortcut.norm
    fc.*, *.num_batches_tracked        -> dropped

timm's ``resnet18/34/50/101/152`` use the same names as torchvision (its "d"/deep-stem variants do
not and are rejected). Keys get ``prefix`` prepended, chosen by where the ResNet sits in the model:

    "backbone."            a meta-arch whose ``backbone`` is ``build_resnet_backbone`` (default)
    "backbone.bottom_up."  a meta-arch whose ``backbone`` is ``build_resnet_fpn_backbone``
    ""                     the bare ResNet module

torchvision ResNets take RGB input normalised with mean [123.675, 116.28, 103.53] and std
[58.395, 57.12, 57.375] (0..255 scale) and put the stride on the 3x3 conv, hence
``configs/Base-ResNet-torchvision.yaml``: INPUT.FORMAT "RGB", those MODEL.PIXEL_MEAN/STD and
MODEL.RESNETS.STRIDE_IN_1X1 False (plus RES2_OUT_CHANNELS 64 for depth 18/34).
"""
import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, Mapping

import torch

__all__ = [
    "convert_torchvision_resnet",
    "infer_resnet_depth",
    "load_resnet_state_dict",
    "save_detectron2_checkpoint",
]

_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
_STEM_RE = re.compile(r"^(conv1|bn1)\.(\w+)$")
_BLOCK_RE = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(\w+)$")
_BLOCKS_PER_DEPTH = {
    (False, (2, 2, 2, 2)): 18,
    (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50,
    (True, (3, 4, 23, 3)): 101,
    (True, (3, 8, 36, 3)): 152,
}


def _rename(key: str):
    """Detectron2 name of a torchvision ResNet key; "" to drop it; None if not a ResNet key."""
    if key in ("fc.weight", "fc.bias"):
        return ""
    match = _STEM_RE.match(key)
    if match:
        module, param = match.groups()
        if module == "conv1":
            return "stem.conv1.weight" if param == "weight" else None
        return _norm_param("stem.conv1.norm", param)
    match = _BLOCK_RE.match(key)
    if not match:
        return None
    layer, block, module, param = match.groups()
    base = f"res{int(layer) + 1}.{block}"
    if module.startswith("conv") or module == "downsample.0":
        name = module if module.startswith("conv") else "shortcut"
        return f"{base}.{name}.weight" if param == "weight" else None
    name = "conv" + module[2:] if module.startswith("bn") else "shortcut"
    return _norm_param(f"{base}.{name}.norm", param)


def _norm_param(module: str, param: str):
    if param == "num_batches_tracked":
        return ""
    return f"{module}.{param}" if param in _BN_PARAMS else None


def convert_torchvision_resnet(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone."
) -> "OrderedDict[str, torch.Tensor]":
    """Rename a torchvision/timm ResNet state dict to Detectron2 ResNet backbone keys.

    Args:
        state_dict: e.g. ``torchvision.models.resnet50().state_dict()`` or timm's ``resnet50``.
        prefix: prepended to every key (a "." is appended when missing); see the module docstring.

    Returns:
        OrderedDict of detached tensor copies, e.g. ``backbone.res2.0.conv1.norm.running_var``
        (the classifier and ``num_batches_tracked`` are dropped).

    Raises:
        ValueError: when keys do not look like a torchvision ResNet, naming them.
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    converted, unexpected = OrderedDict(), []
    for key, value in state_dict.items():
        new_key = _rename(key)
        if new_key is None:
            unexpected.append(key)
        elif new_key:
            converted[prefix + new_key] = value.detach().clone()
    if unexpected or prefix + "stem.conv1.weight" not in converted:
        shown = ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
        raise ValueError(
            "This does not look like a torchvision/timm ResNet state dict (expected conv1, bn1, "
            "layerN.M.convK/bnK/downsample.0/1, fc): "
            + (f"{len(unexpected)} unexpected key(s): {shown}" if unexpected else "no conv1.weight")
        )
    return converted


def infer_resnet_depth(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Detectron2 ``MODEL.RESNETS.DEPTH`` of a torchvision-named ResNet state dict.

    Raises:
        ValueError: for block counts of no standard depth (18, 34, 50, 101, 152).
    """
    blocks = {i: set() for i in range(1, 5)}
    for key in state_dict:
        match = _BLOCK_RE.match(key)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    counts = tuple(len(blocks[i]) for i in range(1, 5))
    bottleneck = any(".conv3." in k for k in state_dict)
    depth = _BLOCKS_PER_DEPTH.get((bottleneck, counts))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(f"No standard ResNet depth has {counts} {kind} blocks per stage")
    return depth


def load_resnet_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Load a torchvision/timm checkpoint (.pth/.pt/.bin or .safetensors) as a flat state dict.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a DDP ``module.`` prefix.
    """
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"Reading {path} needs: pip install safetensors") from e
        state = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # torch < 1.13 has no weights_only
            state = torch.load(path, map_location="cpu")
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def save_detectron2_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Save converted weights so that ``DetectionCheckpointer`` loads them with exact key names.

    ``.pkl``: Detectron2 model-zoo format ``{"model": {name: np.ndarray}, "__author__": "kd_detr",
    "matching_heuristics": False}``; ``.pth``: the same dict with tensors (``torch.save``).
    """
    ext = os.path.splitext(path)[1]
    if ext not in (".pkl", ".pth"):
        raise ValueError(f"Output must end with .pkl or .pth, got {path!r}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if ext == ".pkl":
        model = {k: v.numpy() for k, v in tensors.items()}
    else:
        model = tensors
    checkpoint = {"model": model, "__author__": "kd_detr", "matching_heuristics": False}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if ext == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(checkpoint, f)
    else:
        torch.save(checkpoint, path)
