# Copyright (c) kd_detr contributors.
"""Rule-based renaming of third-party state dicts, shared by the official and detrex converters.

A rule is ``(pattern, target)``: the first pattern that fully matches a key wins. ``target`` is a
replacement string (``re`` groups allowed), a callable ``(match, tensor) -> dict`` for keys that
become several tensors (packed q/k/v), or ``Tied(twin)``: the key duplicates the key ``twin``
(expanded from the match; the same module registered twice) and is dropped once checked equal.
"""
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..modeling.backbone import convert_torchvision_resnet
from .coco_classes import COCO_ID_SLOTS, coco_rows_to_contiguous

__all__ = [
    "Tied",
    "adapt_class_rows",
    "check_hidden_size",
    "expected_class_rows",
    "load_state_dict",
    "rename_keys",
    "split_packed_qkv",
    "torchvision_backbone",
]


class Tied:
    """Rule target of a duplicate key; ``twin`` is the template of the key it duplicates."""

    def __init__(self, twin: str):
        self.twin = twin


Rule = Tuple[str, Union[str, Callable, Tied]]


def load_state_dict(source) -> Dict[str, torch.Tensor]:
    """A flat state dict from a checkpoint path or mapping: unwraps ``{"model": ...}`` (official
    repositories and detrex) and strips a DistributedDataParallel ``module.`` prefix."""
    if isinstance(source, str):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (re-raised with the path)
            raise ValueError(
                f"Could not read {source!r} as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                "pass the .pth file of the official repository or detrex"
            ) from e
    for key in ("model", "state_dict"):
        if isinstance(source, Mapping) and isinstance(source.get(key), Mapping):
            source = source[key]
    if not isinstance(source, Mapping) or not all(torch.is_tensor(v) for v in source.values()):
        raise ValueError("the checkpoint does not hold a state dict of tensors")
    state = dict(source)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def split_packed_qkv(prefix: str) -> Callable:
    """Rule target for ``nn.MultiheadAttention``'s packed ``in_proj_weight`` / ``in_proj_bias``
    (rows q, k, v): ``{prefix}.{q,k,v}_proj.{weight,bias}`` with ``prefix`` expanded from the
    match (``\\1`` ...); the pattern's last group must be "weight" or "bias"."""

    def target(match, value):
        base, param = match.expand(prefix), match.groups()[-1]
        if value.shape[0] % 3:
            raise ValueError(f"{match.string}: {tuple(value.shape)} is not 3 stacked projections")
        q, k, v = value.chunk(3, dim=0)
        return {f"{base}.{name}_proj.{param}": t for name, t in zip("qkv", (q, k, v))}

    return target


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], rules: Sequence[Rule], source_name: str
) -> Dict[str, torch.Tensor]:
    """Apply ``rules`` to every key of ``state_dict``.

    Raises:
        ValueError: naming every key no rule matches, and every tied key whose value differs
            from the key it duplicates.
    """
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    converted, unknown, untied = {}, [], []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if isinstance(target, Tied):
                twin = match.expand(target.twin)
                if twin not in state_dict or not torch.equal(state_dict[twin], value):
                    untied.append(f"{key} (expected equal to {twin})")
            elif callable(target):
                converted.update(target(match, value))
            else:
                converted[match.expand(target)] = value
            break
        else:
            unknown.append(key)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {sorted(unknown)}")
    if untied:
        problems.append(f"tied copies that differ or lack their twin: {sorted(untied)}")
    if problems:
        raise ValueError(
            f"Cannot convert this {source_name} checkpoint (a different model or version?): "
            + "; ".join(problems)
        )
    return converted


def torchvision_backbone(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Tuple[Dict, Dict]:
    """Split off the torchvision ResNet under ``prefix`` (official DETR / DAB-DETR:
    ``backbone.0.body.``) converted to kd_detr ``backbone.*`` keys; returns (backbone, rest)."""
    body = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    if not body:
        raise ValueError(f"no backbone weights under {prefix!r}: not a checkpoint of this source")
    try:
        return dict(convert_torchvision_resnet(body, prefix="backbone.")), rest
    except ValueError as e:
        raise ValueError(f"backbone under {prefix!r}: {e}") from e


def adapt_class_rows(
    state: Dict[str, torch.Tensor],
    key: str,
    expected: int,
    no_object_row: bool,
    coco_classes: str,
    hint: str,
) -> None:
    """Make ``state[key]`` (class logits or label embedding, one row per class) have
    ``expected`` rows, in place.

    With ``coco_classes`` "auto" or "map", a tensor with COCO's 91 category-id slots (+ the "no
    object" row when ``no_object_row``) is reduced to Detectron2's 80 contiguous classes when
    ``expected`` is 80 (+ 1). "keep" never maps.

    Raises:
        ValueError: naming the key, both row counts and ``hint`` (the config key to change).
    """
    if coco_classes not in ("auto", "map", "keep"):
        raise ValueError(f"coco_classes must be 'auto', 'map' or 'keep', got {coco_classes!r}")
    if key not in state:
        return
    rows, extra = state[key].shape[0], int(no_object_row)
    coco_slots = rows == COCO_ID_SLOTS + extra and expected == 80 + extra
    if coco_classes != "keep" and coco_slots:
        state[key] = coco_rows_to_contiguous(state[key], no_object_row)
    elif coco_classes == "map" and rows != COCO_ID_SLOTS + extra:
        raise ValueError(
            f"--coco-classes map: {key} has {rows} rows, not COCO's {COCO_ID_SLOTS + extra}"
        )
    elif rows != expected:
        raise ValueError(
            f"class count: {key} has {rows} rows but the model expects {expected} ({hint}). "
            f"Official COCO checkpoints have {COCO_ID_SLOTS} category-id slots"
            + (" + no-object" if no_object_row else "")
            + "; use an 80-class config to map them to Detectron2's classes."
        )


def check_hidden_size(state: Mapping[str, torch.Tensor], cfg, key: str = "input_proj.weight"):
    """Raise ValueError when ``state[key]``'s output width differs from MODEL.DETR.HIDDEN_DIM."""
    value: Optional[torch.Tensor] = state.get(key)
    if value is not None and value.shape[0] != cfg.MODEL.DETR.HIDDEN_DIM:
        raise ValueError(
            f"hidden size: {key} is {tuple(value.shape)}, i.e. d={value.shape[0]}, but "
            f"MODEL.DETR.HIDDEN_DIM={cfg.MODEL.DETR.HIDDEN_DIM}"
        )


def expected_class_rows(cfg) -> List:
    """(rows of class_embed, whether the last is "no object") for ``cfg``."""
    softmax = not cfg.MODEL.DETR.USE_FOCAL_LOSS
    return [cfg.MODEL.DETR.NUM_CLASSES + int(softmax), softmax]
