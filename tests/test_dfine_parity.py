# Copyright (c) kd_detr contributors.
"""kd_detr DFINE vs Hugging Face ``DFineForObjectDetection`` (random perturbed weights, float32).

The Hugging Face model is saved, converted by ``tools/convert_checkpoint.py --source hf`` and
loaded into the model of ``configs/tests/dfine_tiny_parity.yaml``. Hugging Face reports every
decoder layer only in training mode, so both models run in training mode (dropout 0, no
denoising queries; BatchNorm then uses batch statistics in both): the coarse layer-0 boxes and
logits, every layer's logits (with the LQE) and boxes (FDR), and the selected encoder tokens must
match within 1e-4; in eval mode, the final logits and boxes.
"""
import os

import pytest
import torch

from kd_detr.checkpoint import convert_hf_d_fine, hf_d_fine_config_mismatches
from kd_detr.modeling.meta_arch import DFINE  # noqa: F401  (registers the model)

from .common import REPO_ROOT
from .hf_reference import TINY_REALTIME_HF, HFParityTestCase, parity_cfg, perturb_hf_weights
from .model_helpers import single_thread_module
from .test_rt_detr_parity import images

setUpModule, tearDownModule = single_thread_module()

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dfine_tiny_parity.yaml")
TOLERANCE = 1e-4


def build_hf_dfine(transformers, seed: int = 0, **overrides):
    """The Hugging Face twin of the tiny parity config, weights perturbed (the derived
    ``num_points_scale`` buffers, ``reg_scale`` and ``up`` keep their values)."""
    backbone = transformers.HGNetV2Config(
        stem_channels=[3, 16, 16],
        stage_in_channels=[16, 64, 256, 512],
        stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 256, 512, 1024],
        hidden_sizes=[64, 256, 512, 1024],  # the channels Hugging Face's projections expect
        stage_num_blocks=[1, 1, 2, 1],
        stage_numb_of_layers=[3, 3, 3, 3],
        use_learnable_affine_block=True,
        out_features=["stage2", "stage3", "stage4"],
    )
    kwargs = dict(
        backbone_config=backbone,
        encoder_in_channels=[256, 512, 1024],
        **TINY_REALTIME_HF,
        depth_mult=0.34,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.DFineForObjectDetection(transformers.DFineConfig(**kwargs)).eval()
    keep = {n: b.clone() for n, b in model.named_buffers() if n.endswith("points_scale")}
    fixed = ("reg_scale", "up")
    keep.update({n: p.clone() for n, p in model.named_parameters() if n.endswith(fixed)})
    perturb_hf_weights(model, seed)
    with torch.no_grad():
        state = model.state_dict()
        for name, value in keep.items():
            state[name].copy_(value)
    return model


class TestDFineParity(HFParityTestCase):
    CONFIG = CONFIG

    def test_parity_every_layer(self):
        hf = build_hf_dfine(self.transformers, num_denoising=0)
        model = self.convert_and_load(self.save_hf(hf), ["MODEL.DETR.DN.ENABLED", "False"])[0]
        x, mask = images()
        model.train()
        hf.train()
        with torch.no_grad():
            ours = model.forward_raw((x, mask))
            theirs = hf(pixel_values=x)
        layers = ours["layers"]
        num = layers["pred_logits"].shape[0]
        self.assertEqual(tuple(layers["pred_logits"].shape), (2, 2, 10, 5))
        self.assertEqual(theirs.intermediate_logits.shape[1], num + 1)  # + the coarse layer 0
        pairs = [
            ("encoder logits", ours["enc_outputs"]["pred_logits"], theirs.enc_topk_logits),
            ("encoder boxes", ours["enc_outputs"]["pred_boxes"], theirs.enc_topk_bboxes),
            ("coarse logits", layers["pre_logits"], theirs.intermediate_logits[:, 0]),
            ("coarse boxes", layers["pre_boxes"], theirs.intermediate_reference_points[:, 0]),
        ]
        for i in range(num):
            pairs += [
                (
                    f"layer {i} logits",
                    layers["pred_logits"][i],
                    theirs.intermediate_logits[:, i + 1],
                ),
                (
                    f"layer {i} boxes",
                    layers["pred_boxes"][i],
                    theirs.intermediate_reference_points[:, i + 1],
                ),
                (
                    f"layer {i} corners",
                    layers["pred_corners"][i],
                    theirs.intermediate_predicted_corners[:, i],
                ),
            ]
        diffs = {name: (a - b).abs().max().item() for name, a, b in pairs}
        print(f"max abs diff vs Hugging Face DFineForObjectDetection (train mode): {diffs}")
        for name, diff in diffs.items():
            self.assertLessEqual(diff, TOLERANCE, name)
        self.assertGreater((layers["pred_boxes"][0] - layers["pred_boxes"][1]).abs().max(), 1e-3)
        # eval mode: the final (last-layer) predictions
        model.eval()
        hf.eval()
        with torch.no_grad():
            ours = model.forward_raw((x, mask))
            theirs = hf(pixel_values=x)
        final = {
            "final logits": (ours["pred_logits"] - theirs.logits).abs().max().item(),
            "final boxes": (ours["pred_boxes"] - theirs.pred_boxes).abs().max().item(),
        }
        print(f"max abs diff vs Hugging Face DFineForObjectDetection (eval): {final}")
        for name, diff in final.items():
            self.assertLessEqual(diff, TOLERANCE, name)

    def test_config_mismatch_and_bad_keys(self):
        hf = build_hf_dfine(self.transformers)
        config = hf.config.to_dict()
        self.assertEqual(hf_d_fine_config_mismatches(config, parity_cfg(CONFIG)), [])
        opts = ["MODEL.DFINE.NUM_BINS", "16", "MODEL.HGNETV2.USE_LAB", "False"]
        problems = hf_d_fine_config_mismatches(config, parity_cfg(CONFIG, opts))
        self.assertIn("max_num_bins=32 but MODEL.DFINE.NUM_BINS=16", problems)
        self.assertIn(
            "backbone use_learnable_affine_block=True but MODEL.HGNETV2.USE_LAB=False", problems
        )
        state = dict(hf.state_dict())
        state["model.extra_head.weight"] = torch.zeros(1)
        with self.assertRaisesRegex(ValueError, "model.extra_head.weight"):
            convert_hf_d_fine(state, config)


RECIPES = os.path.join(REPO_ROOT, "configs", "d_fine")


def hf_recipe_configs(t):
    """Recipe -> the Hugging Face DFineConfig with the official model's values (80 classes)."""
    b0 = dict(
        stem_channels=[3, 16, 16],
        stage_in_channels=[16, 64, 256, 512],
        stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 256, 512, 1024],
        hidden_sizes=[64, 256, 512, 1024],
        stage_num_blocks=[1, 1, 2, 1],
        stage_numb_of_layers=[3, 3, 3, 3],
        use_learnable_affine_block=True,
    )
    b2 = dict(
        stem_channels=[3, 24, 32],
        stage_in_channels=[32, 96, 384, 768],
        stage_mid_channels=[32, 64, 128, 256],
        stage_out_channels=[96, 384, 768, 1536],
        hidden_sizes=[96, 384, 768, 1536],
        stage_num_blocks=[1, 1, 3, 1],
        stage_numb_of_layers=[4, 4, 4, 4],
        use_learnable_affine_block=True,
    )
    three = ["stage2", "stage3", "stage4"]
    return {
        "dfine_hgnetv2_l_coco.yaml": t.DFineConfig(num_labels=80),
        "dfine_hgnetv2_m_coco.yaml": t.DFineConfig(
            num_labels=80,
            backbone_config=t.HGNetV2Config(out_features=three, **b2),
            encoder_in_channels=[384, 768, 1536],
            depth_mult=0.67,
            decoder_layers=4,
            decoder_n_points=[3, 6, 3],
        ),
        "dfine_hgnetv2_s_coco.yaml": t.DFineConfig(
            num_labels=80,
            backbone_config=t.HGNetV2Config(out_features=three, **b0),
            encoder_in_channels=[256, 512, 1024],
            hidden_expansion=0.5,
            depth_mult=0.34,
            decoder_layers=3,
            decoder_n_points=[3, 6, 3],
        ),
        "dfine_hgnetv2_n_coco.yaml": t.DFineConfig(
            num_labels=80,
            backbone_config=t.HGNetV2Config(out_features=["stage3", "stage4"], **b0),
            encoder_in_channels=[512, 1024],
            feat_strides=[16, 32],
            encoder_hidden_dim=128,
            encode_proj_layers=[1],
            encoder_ffn_dim=512,
            hidden_expansion=0.34,
            depth_mult=0.5,
            d_model=128,
            decoder_in_channels=[128, 128],
            decoder_ffn_dim=512,
            num_feature_levels=2,
            decoder_layers=3,
            decoder_n_points=[6, 6],
        ),
    }


class TestDFineRecipes(HFParityTestCase):
    def test_recipes_match_hugging_face_configs(self):
        configs = hf_recipe_configs(self.transformers)
        self.assertEqual(sorted(configs), sorted(os.listdir(RECIPES)))
        for name, config in configs.items():
            with self.subTest(recipe=name):
                cfg = parity_cfg(os.path.join(RECIPES, name))
                self.assertEqual(hf_d_fine_config_mismatches(config.to_dict(), cfg), [])

    @pytest.mark.slow
    def test_default_size_conversion(self):
        """DFineConfig() (D-FINE-L) converts into its recipe with equal final outputs."""
        from .test_rt_detr_recipes import perturb_outside_backbone

        torch.manual_seed(0)
        hf = self.transformers.DFineForObjectDetection(self.transformers.DFineConfig(num_labels=80))
        keep = {n: b.clone() for n, b in hf.named_buffers() if n.endswith("points_scale")}
        perturb_outside_backbone(hf.eval())
        with torch.no_grad():
            hf.model.decoder.reg_scale.fill_(4.0)
            hf.model.decoder.up.fill_(0.5)
            for name, value in keep.items():
                hf.state_dict()[name].copy_(value)
        self.CONFIG = os.path.join(RECIPES, "dfine_hgnetv2_l_coco.yaml")
        model = self.convert_and_load(self.save_hf(hf), ["MODEL.DEVICE", "cpu"])[0]
        x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model.forward_raw((x, torch.zeros(1, 320, 320, dtype=torch.bool)))
            theirs = hf(pixel_values=x)
        logits = (ours["pred_logits"] - theirs.logits).abs().max().item()
        boxes = (ours["pred_boxes"] - theirs.pred_boxes).abs().max().item()
        print(f"D-FINE-L default size: max abs diff logits {logits:.2e}, boxes {boxes:.2e}")
        self.assertLessEqual(logits, 1e-4)
        self.assertLessEqual(boxes, 1e-4)
