# Copyright (c) kd_detr contributors.
"""Optimizer for DETR-family recipes: AdamW/SGD, per-parameter lr multipliers, full-model clip.

Detectron2 (v0.6 and main) clips gradients per parameter ("value" / "norm"); DETR recipes clip the
norm of all gradients together. ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` selects that here.
"""
import itertools
import logging
from typing import Dict, List

import torch

from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["build_optimizer", "param_groups"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


def _lr_factor(name: str, overrides: Dict[str, float]) -> float:
    factor = 1.0
    for key, value in overrides.items():
        if key in name:
            factor *= value
    return factor


def parse_lr_multipliers(cfg) -> Dict[str, float]:
    """``{name substring: factor}`` from SOLVER.BACKBONE_MULTIPLIER and SOLVER.LR_MULTIPLIERS."""
    overrides = {"backbone.": cfg.SOLVER.BACKBONE_MULTIPLIER}
    for item in cfg.SOLVER.LR_MULTIPLIERS:
        key, sep, value = item.rpartition(":")
        try:
            overrides[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ValueError(
                f"SOLVER.LR_MULTIPLIERS entry {item!r} is not 'name_substring:factor', "
                "e.g. 'sampling_offsets:0.1'."
            )
    return overrides


def param_groups(model: torch.nn.Module, cfg) -> List[dict]:
    """Parameter groups with their lr and weight decay; frozen parameters are left out.

    lr = SOLVER.BASE_LR x every matching multiplier (x SOLVER.BIAS_LR_FACTOR for biases); weight
    decay is SOLVER.WEIGHT_DECAY, WEIGHT_DECAY_NORM for norm layers, WEIGHT_DECAY_BIAS (when set)
    for biases, as in Detectron2. Parameters sharing (lr, weight decay) share a group.
    """
    overrides = parse_lr_multipliers(cfg)
    solver = cfg.SOLVER
    by_setting, seen = {}, set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            lr = solver.BASE_LR * _lr_factor(full_name, overrides)
            decay = solver.WEIGHT_DECAY
            if isinstance(module, _NORM_TYPES):
                decay = solver.WEIGHT_DECAY_NORM
            elif name == "bias":
                lr *= solver.BIAS_LR_FACTOR
                if solver.WEIGHT_DECAY_BIAS is not None:
                    decay = solver.WEIGHT_DECAY_BIAS
            by_setting.setdefault((lr, decay), []).append(param)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in by_setting.items()]


def _full_model_clipping(optimizer_cls, clip_norm):
    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"FullModelGradientClipping{optimizer_cls.__name__}"
    return FullModelGradientClipping


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build SOLVER.OPTIMIZER ("ADAMW" or "SGD") over ``model``'s trainable parameters."""
    groups = param_groups(model, cfg)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER is {cfg.SOLVER.OPTIMIZER!r}; use 'ADAMW' or 'SGD'.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _full_model_clipping(optimizer_cls, clip.CLIP_VALUE)
        optimizer = optimizer_cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
    else:
        optimizer = maybe_add_gradient_clipping(cfg, optimizer_cls)(
            groups, lr=cfg.SOLVER.BASE_LR, **kwargs
        )
    logger.info(
        f"{type(optimizer).__name__}: {len(groups)} parameter groups, "
        f"{sum(p.numel() for g in groups for p in g['params']):,} parameters"
    )
    return optimizer
