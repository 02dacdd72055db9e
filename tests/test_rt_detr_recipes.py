# Copyright (c) kd_detr contributors.
"""RT-DETR recipes: their values equal the Hugging Face configs they reproduce (RTDetrConfig(),
RTDetrV2Config(), the PekingU/rtdetr_r18vd / r34vd / r101vd shapes), a default-size Hugging Face
model converts into the R50vd recipes with equal outputs, and train_net.py's eval-only run
reproduces the training evaluation of the RT-DETR demo."""
import os
import unittest

import pytest
import torch

from kd_detr.checkpoint import hf_rt_detr_config_mismatches
from kd_detr.config import load_config

from .common import REPO_ROOT, require_module
from .hf_reference import HFParityTestCase
from .model_helpers import single_thread_module
from .test_train_net import _TrainNetCase

setUpModule, tearDownModule = single_thread_module()

RECIPES = os.path.join(REPO_ROOT, "configs", "rt_detr")


def recipe(name, *opts):
    return load_config(os.path.join(RECIPES, name), list(opts))


def hf_configs(transformers):
    """Recipe file -> the Hugging Face config of the same model (80 COCO classes)."""
    basic = dict(layer_type="basic", hidden_sizes=[64, 128, 256, 512], out_indices=[2, 3, 4])
    small = dict(encoder_in_channels=[128, 256, 512], hidden_expansion=0.5)

    def resnet(**kwargs):
        return transformers.RTDetrResNetConfig(**kwargs)

    r18 = dict(backbone_config=resnet(depths=[2, 2, 2, 2], **basic), decoder_layers=3, **small)
    r34 = dict(backbone_config=resnet(depths=[3, 4, 6, 3], **basic), decoder_layers=4, **small)
    r101 = dict(
        backbone_config=resnet(depths=[3, 4, 23, 3], out_indices=[2, 3, 4]),
        encoder_hidden_dim=384,
        encoder_ffn_dim=2048,
        decoder_in_channels=[384, 384, 384],
    )
    v1, v2 = transformers.RTDetrConfig, transformers.RTDetrV2Config
    return {
        "rt_detr_r50vd_6x_coco.yaml": v1(num_labels=80),
        "rt_detrv2_r50vd_6x_coco.yaml": v2(num_labels=80),
        "rt_detr_r18vd_6x_coco.yaml": v1(num_labels=80, **r18),
        "rt_detrv2_r18vd_6x_coco.yaml": v2(num_labels=80, **r18),
        "rt_detr_r34vd_6x_coco.yaml": v1(num_labels=80, **r34),
        "rt_detr_r101vd_6x_coco.yaml": v1(num_labels=80, **r101),
    }


class TestRecipesEqualHuggingFaceConfigs(unittest.TestCase):
    def test_every_recipe_matches_its_hugging_face_config(self):
        transformers = require_module("transformers")
        configs = hf_configs(transformers)
        self.assertEqual(sorted(configs), sorted(os.listdir(RECIPES)))
        for name, hf_config in configs.items():
            with self.subTest(recipe=name):
                problems = hf_rt_detr_config_mismatches(hf_config.to_dict(), recipe(name))
                self.assertEqual(problems, [])

    def test_recipe_schedule(self):
        cfg = recipe("rt_detr_r50vd_6x_coco.yaml")
        self.assertEqual(cfg.SOLVER.IMS_PER_BATCH, 16)
        self.assertEqual(cfg.SOLVER.MAX_ITER, 527697)  # ceil(72 x 117,266 / 16)
        self.assertEqual((cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER), (1e-4, 0.1))
        self.assertEqual(cfg.SOLVER.WARMUP_ITERS, 2000)


def perturb_outside_backbone(model, seed=0):
    """Add N(0, 0.1) noise to every float weight outside the backbone (running variances from
    U(0.5, 1.5)); the backbone keeps its initialisation, whose activations stay of order 100
    (a perturbed R50's reach 1e16 and drown float32 comparisons in rounding)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.startswith("model.backbone.") or name.endswith("n_points_scale"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))
    return model


@pytest.mark.slow
class TestDefaultSizeConversion(HFParityTestCase):
    """A default-size Hugging Face model (R50vd, d 256, 300 queries, 6 layers) converts into the
    recipe with the CLI and gives the same logits and boxes in every layer (320 x 320 image)."""

    def check(self, hf, config):
        self.CONFIG = os.path.join(RECIPES, config)
        folder = self.save_hf(perturb_outside_backbone(hf.eval()))
        model = self.convert_and_load(folder, ["MODEL.DEVICE", "cpu"])[0]
        x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model.forward_raw((x, torch.zeros(1, 320, 320, dtype=torch.bool)))
            theirs = hf(pixel_values=x)
        layers = ours["layers"]
        logits = (layers["pred_logits"] - theirs.intermediate_logits.transpose(0, 1)).abs()
        boxes = (layers["pred_boxes"] - theirs.intermediate_reference_points.transpose(0, 1)).abs()
        print(f"{config}: max abs diff logits {logits.max():.2e}, boxes {boxes.max():.2e}")
        self.assertEqual(logits.shape[0], 6)
        self.assertLessEqual(logits.max().item(), 1e-4)
        self.assertLessEqual(boxes.max().item(), 1e-4)

    def test_rt_detr_r50vd(self):
        torch.manual_seed(0)
        t = self.transformers
        hf = t.RTDetrForObjectDetection(t.RTDetrConfig(num_labels=80))
        self.check(hf, "rt_detr_r50vd_6x_coco.yaml")

    def test_rt_detrv2_r50vd(self):
        torch.manual_seed(1)
        t = self.transformers
        hf = t.RTDetrV2ForObjectDetection(t.RTDetrV2Config(num_labels=80))
        with torch.no_grad():
            for name, buf in hf.named_buffers():
                if name.endswith("n_points_scale"):
                    buf.fill_(0.25)  # 1 / points, as built
        self.check(hf, "rt_detrv2_r50vd_6x_coco.yaml")


class TestTrainNetRTDETR(_TrainNetCase, unittest.TestCase):
    config = "rt_detr_efflite0_demo.yaml"
    num_classes_key = "MODEL.DETR.NUM_CLASSES"


if __name__ == "__main__":
    unittest.main()
