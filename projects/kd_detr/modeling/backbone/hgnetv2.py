# Copyright (c) kd_detr contributors.
"""HGNetv2 (PaddlePaddle's PP-HGNetV2), the backbone of D-FINE, as a Detectron2 backbone.

A stem (3x3 s2 conv, a 2x2-conv branch next to a 2x2 max pool, 3x3 s2 and 1x1 convs; stride 4),
then 4 stages: an optional depthwise 3x3 stride-2 conv, then HG blocks that concatenate the input
with the outputs of ``L`` stacked convs (3x3, or "light" 1x1 + depthwise k x k) and squeeze /
excite the concatenation with two 1x1 convs (residual from the second block on). Optional
learnable affine blocks (a scalar scale and bias after every activation, "LAB").

The architecture is given explicitly (``MODEL.HGNETV2.*``, the fields of transformers'
``HGNetV2Config``); the defaults are transformers' (= PP-HGNetV2-B4, D-FINE-L). Module names
follow transformers' ``HGNetV2Backbone`` (``embedder.stem1`` .. ``encoder.stages.{i}``), so its
weights load with plain renaming. Outputs ``stage1`` .. ``stage4`` (strides 4, 8, 16, 32 with the
default downsampling).
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["HGNetV2", "build_hgnetv2_backbone"]


class LearnableAffine(nn.Module):
    """``scale * x + bias`` with two learned scalars."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias, padding (k - 1) // 2) -> norm -> ReLU (unless ``act`` is False) -> LAB."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, act=True, lab=False, norm="BN"):
        super().__init__()
        self.convolution = nn.Conv2d(
            cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False
        )
        self.normalization = get_norm(norm, cout)
        self.act = act
        self.lab = LearnableAffine() if act and lab else None

    def forward(self, x):
        x = self.normalization(self.convolution(x))
        if self.act:
            x = F.relu(x)
        return x if self.lab is None else self.lab(x)


class LightConv(nn.Module):
    """1x1 conv (no activation) then depthwise k x k conv."""

    def __init__(self, cin, cout, kernel, lab, norm):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 1, act=False, lab=lab, norm=norm)
        self.conv2 = ConvBNAct(cout, cout, kernel, groups=cout, lab=lab, norm=norm)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class HGBlock(nn.Module):
    """``num_layers`` stacked convs whose outputs are concatenated with the input, squeezed to
    ``cout / 2`` and excited to ``cout`` by 1x1 convs; optional residual."""

    def __init__(self, cin, mid, cout, num_layers, kernel, residual, light, lab, norm):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList(
            (LightConv(cin if i == 0 else mid, mid, kernel, lab, norm) if light else
             ConvBNAct(cin if i == 0 else mid, mid, kernel, lab=lab, norm=norm))
            for i in range(num_layers)
        )  # fmt: skip
        total = cin + num_layers * mid
        self.aggregation = nn.Sequential(
            ConvBNAct(total, cout // 2, 1, lab=lab, norm=norm),
            ConvBNAct(cout // 2, cout, 1, lab=lab, norm=norm),
        )

    def forward(self, x):
        outs = [x]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        y = self.aggregation(torch.cat(outs, 1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    """Optional depthwise 3x3 stride-``stride`` conv, then ``blocks`` HG blocks."""

    def __init__(self, cin, mid, cout, blocks, downsample, stride, light, kernel, layers, lab,
                 norm):  # fmt: skip
        super().__init__()
        self.downsample = (
            ConvBNAct(cin, cin, 3, stride, groups=cin, act=False, norm=norm) if downsample else None
        )
        self.blocks = nn.ModuleList(
            HGBlock(cin if i == 0 else cout, mid, cout, layers, kernel, i > 0, light, lab, norm)
            for i in range(blocks)
        )

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class HGNetV2(Backbone):
    """PP-HGNetV2 with an explicit architecture (see the module docstring).

    Args:
        stem_channels: (in, mid, out) of the stem.
        stage_in_channels, stage_mid_channels, stage_out_channels: per stage.
        stage_num_blocks, stage_num_layers: HG blocks per stage, convs per block.
        stage_downsample (Sequence[bool]), stage_light_block (Sequence[bool]),
        stage_kernel_size (Sequence[int]): per stage.
        use_lab (bool): learnable affine blocks.
        out_features: among "stage1" .. "stage4".
        norm (str): Detectron2 norm ("FrozenBN", "BN", ...).
        freeze_at (int): freeze the stem (>= 1) and stage1 .. stage{freeze_at - 1}.
    """

    def __init__(
        self,
        stem_channels: Sequence[int] = (3, 32, 48),
        stage_in_channels: Sequence[int] = (48, 128, 512, 1024),
        stage_mid_channels: Sequence[int] = (48, 96, 192, 384),
        stage_out_channels: Sequence[int] = (128, 512, 1024, 2048),
        stage_num_blocks: Sequence[int] = (1, 1, 3, 1),
        stage_downsample: Sequence[bool] = (False, True, True, True),
        stage_light_block: Sequence[bool] = (False, False, True, True),
        stage_kernel_size: Sequence[int] = (3, 3, 5, 5),
        stage_num_layers: Sequence[int] = (6, 6, 6, 6),
        use_lab: bool = False,
        out_features: Sequence[str] = ("stage2", "stage3", "stage4"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
    ):
        super().__init__()
        per_stage = [
            stage_in_channels, stage_mid_channels, stage_out_channels, stage_num_blocks,
            stage_downsample, stage_light_block, stage_kernel_size, stage_num_layers,
        ]  # fmt: skip
        if len({len(v) for v in per_stage}) != 1:
            raise ValueError(
                "MODEL.HGNETV2.STAGE_* lists must all have one entry per stage, got lengths "
                f"{[len(v) for v in per_stage]}"
            )
        names = [f"stage{i + 1}" for i in range(len(stage_in_channels))]
        if not out_features or any(f not in names for f in out_features):
            raise ValueError(
                f"MODEL.HGNETV2.OUT_FEATURES must be among {names}, got {list(out_features)}"
            )
        c_in, c_mid, c_out = stem_channels
        self.embedder = nn.Module()
        e = self.embedder
        e.stem1 = ConvBNAct(c_in, c_mid, 3, 2, lab=use_lab, norm=norm)
        e.stem2a = ConvBNAct(c_mid, c_mid // 2, 2, 1, lab=use_lab, norm=norm)
        e.stem2b = ConvBNAct(c_mid // 2, c_mid, 2, 1, lab=use_lab, norm=norm)
        e.stem3 = ConvBNAct(c_mid * 2, c_mid, 3, 2, lab=use_lab, norm=norm)
        e.stem4 = ConvBNAct(c_mid, c_out, 1, 1, lab=use_lab, norm=norm)
        self.encoder = nn.Module()
        self.encoder.stages = nn.ModuleList(
            HGStage(*args, 2, light, kernel, layers, use_lab, norm)
            for *args, light, kernel, layers in zip(
                stage_in_channels, stage_mid_channels, stage_out_channels, stage_num_blocks,
                stage_downsample, stage_light_block, stage_kernel_size, stage_num_layers,
            )
        )  # fmt: skip
        self.stage_names: List[str] = names
        self._out_features = list(out_features)
        stride = 4
        self._out_feature_strides: Dict[str, int] = {}
        self._out_feature_channels: Dict[str, int] = {}
        for name, down, cout in zip(names, stage_downsample, stage_out_channels):
            stride *= 2 if down else 1
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = cout
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "HGNetV2":
        """Freeze the stem (``freeze_at`` >= 1) and stage1 .. stage{freeze_at - 1}."""
        modules = [self.embedder] + list(self.encoder.stages)
        for module in modules[: max(freeze_at, 0)]:
            for p in module.parameters():
                p.requires_grad_(False)
        return self

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, C, H / stride, W / stride)} for ``out_features``."""
        e = self.embedder
        x = F.pad(e.stem1(x), (0, 1, 0, 1))
        branch = e.stem2b(F.pad(e.stem2a(x), (0, 1, 0, 1)))
        pooled = F.max_pool2d(x, kernel_size=2, stride=1, ceil_mode=True)
        x = e.stem4(e.stem3(torch.cat([pooled, branch], 1)))
        outputs = {}
        for name, stage in zip(self.stage_names, self.encoder.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        channels, strides = self._out_feature_channels, self._out_feature_strides
        return {n: ShapeSpec(channels=channels[n], stride=strides[n]) for n in self._out_features}


@BACKBONE_REGISTRY.register()
def build_hgnetv2_backbone(cfg, input_shape: ShapeSpec) -> HGNetV2:
    """HGNetv2 from ``MODEL.HGNETV2`` (the architecture fields of transformers' HGNetV2Config)."""
    c = cfg.MODEL.HGNETV2
    if input_shape.channels != c.STEM_CHANNELS[0]:
        raise ValueError(
            f"MODEL.HGNETV2.STEM_CHANNELS[0] ({c.STEM_CHANNELS[0]}) must equal the input channels "
            f"({input_shape.channels})"
        )
    return HGNetV2(
        stem_channels=c.STEM_CHANNELS,
        stage_in_channels=c.STAGE_IN_CHANNELS,
        stage_mid_channels=c.STAGE_MID_CHANNELS,
        stage_out_channels=c.STAGE_OUT_CHANNELS,
        stage_num_blocks=c.STAGE_NUM_BLOCKS,
        stage_downsample=c.STAGE_DOWNSAMPLE,
        stage_light_block=c.STAGE_LIGHT_BLOCK,
        stage_kernel_size=c.STAGE_KERNEL_SIZE,
        stage_num_layers=c.STAGE_NUM_LAYERS,
        use_lab=c.USE_LAB,
        out_features=c.OUT_FEATURES,
        norm=c.NORM,
        freeze_at=c.FREEZE_AT,
    )
