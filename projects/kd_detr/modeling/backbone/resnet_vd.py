# Copyright (c) kd_detr contributors.
"""ResNet-vd (He et al., "Bag of Tricks", 2019), the backbone of RT-DETR, as a Detectron2 backbone.

Differences from Detectron2's ResNet: a deep stem of three 3x3 convs (c/2 stride 2, c/2, c) and a
3x3 stride-2 max pool; the stride of a bottleneck block sits on its 3x3 conv; a downsampling block's
shortcut is a 2x2 average pool (stride 2, ceil mode) followed by a 1x1 conv instead of a strided
1x1 conv. The first block of every stage has a projection shortcut (also ResNet-18/34's first stage,
whose channels do not change), as in RT-DETR's PResNet and transformers' ``RTDetrResNetBackbone``.

Outputs ``res2`` .. ``res5`` (strides 4 .. 32); module names follow Detectron2's ResNet
(``stem.conv1..3``, ``res{2..5}.{block}.conv{1..3}`` and ``.shortcut``, each with ``.norm``).
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["ResNetVD", "build_resnet_vd_backbone", "RESNET_VD_SPECS"]

# depth -> (block type, blocks per stage)
RESNET_VD_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv(cin: int, cout: int, kernel: int, stride: int, norm: str, relu: bool) -> Conv2d:
    return Conv2d(
        cin,
        cout,
        kernel_size=kernel,
        stride=stride,
        padding=kernel // 2,
        bias=False,
        norm=get_norm(norm, cout),
        activation=F.relu if relu else None,
    )


class _Block(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3 strided, 1x1 x4) residual block."""

    def __init__(self, kind: str, cin: int, cout: int, stride: int, project: bool, norm: str):
        super().__init__()
        if kind == "basic":
            self.conv1 = _conv(cin, cout, 3, stride, norm, True)
            self.conv2 = _conv(cout, cout, 3, 1, norm, False)
            self.convs = [self.conv1, self.conv2]
        else:
            mid = cout // 4
            self.conv1 = _conv(cin, mid, 1, 1, norm, True)
            self.conv2 = _conv(mid, mid, 3, stride, norm, True)
            self.conv3 = _conv(mid, cout, 1, 1, norm, False)
            self.convs = [self.conv1, self.conv2, self.conv3]
        self.pool_shortcut = project and stride == 2
        self.shortcut = _conv(cin, cout, 1, 1, norm, False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for conv in self.convs:
            out = conv(out)
        if self.shortcut is not None:
            if self.pool_shortcut:
                x = F.avg_pool2d(x, 2, 2, 0, ceil_mode=True)
            x = self.shortcut(x)
        return F.relu(out + x)


class ResNetVD(Backbone):
    """ResNet-vd (depth 18/34/50/101) with a deep stem and average-pool shortcuts.

    Args:
        depth (int): 18, 34, 50 or 101.
        out_features (Sequence[str]): among "res2" .. "res5".
        norm (str): Detectron2 norm name ("FrozenBN" as RT-DETR's R50/R101, "BN" ...).
        freeze_at (int): freeze the stem (1) and the first ``freeze_at - 1`` stages; 0 = none.
        stem_channels (int): stem output channels (64).
        in_channels (int): image channels.
    """

    def __init__(
        self,
        depth: int,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        stem_channels: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        if depth not in RESNET_VD_SPECS:
            raise ValueError(
                f"ResNet-vd depth must be one of {sorted(RESNET_VD_SPECS)} "
                f"(MODEL.RESNET_VD.DEPTH), got {depth}"
            )
        names = ["res2", "res3", "res4", "res5"]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.RESNET_VD.OUT_FEATURES must be a non-empty subset of {names}, got "
                f"{list(out_features)}"
            )
        kind, blocks = RESNET_VD_SPECS[depth]
        self.depth = depth
        self.stem = nn.Module()
        half = stem_channels // 2
        self.stem.conv1 = _conv(in_channels, half, 3, 2, norm, True)
        self.stem.conv2 = _conv(half, half, 3, 1, norm, True)
        self.stem.conv3 = _conv(half, stem_channels, 3, 1, norm, True)
        widths = [64, 128, 256, 512] if kind == "basic" else [256, 512, 1024, 2048]
        self._out_features = list(out_features)
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        self.stage_names: List[str] = []
        cin = stem_channels
        for i, (name, width, count) in enumerate(zip(names, widths, blocks)):
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(
                *[
                    _Block(kind, width if b else cin, width, 1 if b else stride, b == 0, norm)
                    for b in range(count)
                ]
            )
            self.add_module(name, stage)
            self.stage_names.append(name)
            cin = width
            self._out_feature_channels[name] = width
            self._out_feature_strides[name] = 4 * 2**i
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "ResNetVD":
        """Freeze the stem (``freeze_at`` >= 1) and stages res2 .. res{freeze_at} (>= 2)."""
        modules = [self.stem] + [getattr(self, n) for n in self.stage_names]
        for module in modules[: max(freeze_at, 0)]:
            for p in module.parameters():
                p.requires_grad_(False)
        return self

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, C, H, W) -> {name: (B, C_name, H / stride, W / stride)} for ``out_features``."""
        x = self.stem.conv3(self.stem.conv2(self.stem.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outputs = {}
        for name in self.stage_names:
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
def build_resnet_vd_backbone(cfg, input_shape: ShapeSpec) -> ResNetVD:
    """ResNet-vd from ``MODEL.RESNET_VD`` (DEPTH, OUT_FEATURES, NORM, FREEZE_AT, STEM_CHANNELS)."""
    c = cfg.MODEL.RESNET_VD
    return ResNetVD(
        c.DEPTH,
        out_features=c.OUT_FEATURES,
        norm=c.NORM,
        freeze_at=c.FREEZE_AT,
        stem_channels=c.STEM_CHANNELS,
        in_channels=input_shape.channels,
    )
