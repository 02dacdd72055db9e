# Copyright (c) kd_detr contributors.
"""fundamentalvision/Deformable-DETR (``--source deformable_detr``) and detrex Deformable DETR
(``--source detrex``) checkpoint import: synthetic state dicts built from the key/shape fixtures
of every variant (plain, box refinement, two-stage) convert and load strictly into the model of
the matching config, values land in the right places, COCO's 91 category-id slots map to
Detectron2's 80 classes, and bad checkpoints give errors naming the keys."""
import os
import tempfile
import unittest

import torch
import torchvision

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone

from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, check_state_dict_keys
from kd_detr.checkpoint.coco_classes import coco_category_ids
from kd_detr.checkpoint.hf_deformable_detr import initial_box_pos_head

from .common import REPO_ROOT
from .fixtures import checkpoint_keys
from .fixtures import deformable_checkpoint_keys as fixtures
from .hf_reference import load_convert_checkpoint_cli
from .model_helpers import assert_loads_strictly, config_from

torch.set_num_threads(1)
CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")
REFINE = ("MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True")
TWO_STAGE = ("MODEL.DETR.DEFORMABLE.TWO_STAGE", "True")
COCO80 = ("MODEL.DETR.NUM_CLASSES", "80")
R50 = ("MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256")
D = 64
T = "transformer."


def make_cfg(*opts, path=CONFIG):
    return config_from(path, *opts, freeze=True)


def synthetic(keys, seed=0):
    """Random tensors with the fixture's shapes, saved as the reference code saves them: without
    box refinement every ``class_embed.i`` / ``bbox_embed.i`` is the same module, and the heads
    the decoder registers again (``transformer.decoder.*_embed``) equal the top-level ones."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) for k, shape in keys.items()}
    refine = any(k.startswith(T + "decoder.bbox_embed.") for k in keys)
    for key in state:
        parts = key.split(".")
        if not refine and parts[0] in ("class_embed", "bbox_embed") and parts[1].isdigit():
            state[key] = state[".".join([parts[0], "0"] + parts[2:])]
        if key.startswith(T + "decoder.class_embed.") or key.startswith(T + "decoder.bbox_embed."):
            state[key] = state[key[len(T + "decoder.") :]].clone()
    return state


class _DeformableImportCase(unittest.TestCase):
    def convert_and_load(self, source, keys, *opts, coco_classes="auto"):
        """Convert a synthetic checkpoint and load it strictly; returns (source state, model)."""
        src = synthetic(keys)
        cfg = make_cfg(*opts)
        state = CHECKPOINT_CONVERTERS[source](src, cfg, coco_classes=coco_classes)
        model = build_model(cfg)
        check_state_dict_keys(state, model.state_dict())
        model.load_state_dict(state, strict=True)
        return src, model

    def assert_same(self, ours, theirs):
        self.assertTrue(torch.equal(ours.detach(), theirs), f"{tuple(ours.shape)}")


class TestFixtures(unittest.TestCase):
    def test_torchvision_resnet_keys_match_torchvision(self):
        for depth in (18, 50):
            with torch.device("meta"):
                model = getattr(torchvision.models, f"resnet{depth}")()
            expected = {
                k: tuple(v.shape)
                for k, v in model.state_dict().items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
            }
            self.assertEqual(dict(fixtures.torchvision_resnet("", depth)), expected)

    def test_detectron2_resnet_keys_match_detectron2(self):
        for depth, res2_channels in ((18, 64), (50, 256)):
            cfg = make_cfg(
                "MODEL.RESNETS.DEPTH", str(depth),
                "MODEL.RESNETS.RES2_OUT_CHANNELS", str(res2_channels),
                "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.OUT_FEATURES", "['res5']",
            )  # fmt: skip
            with torch.device("meta"):
                model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            self.assertEqual(dict(fixtures.detectron2_resnet("", depth)), expected)


class TestOfficialDeformableDETR(_DeformableImportCase):
    def test_plain_resnet50_values_land_in_place(self):
        keys = fixtures.deformable_detr_keys(class_rows=5, depth=50)
        src, model = self.convert_and_load("deformable_detr", keys, *R50)
        t = model.transformer
        enc = "transformer.encoder.layers.1."
        offsets = src[enc + "self_attn.sampling_offsets.weight"]
        self.assert_same(t.encoder.layers[1].self_attn.sampling_offsets.weight, offsets)
        self.assert_same(t.encoder.layers[1].ffn.linear2.bias, src[enc + "linear2.bias"])
        dec = "transformer.decoder.layers.0."
        layer = t.decoder.layers[0]
        packed = src[dec + "self_attn.in_proj_weight"]
        self.assert_same(layer.self_attn.q_proj.weight, packed[:D])
        self.assert_same(layer.self_attn.k_proj.weight, packed[D : 2 * D])
        self.assert_same(layer.self_attn.v_proj.weight, packed[2 * D :])
        self.assert_same(layer.self_attn.v_proj.bias, src[dec + "self_attn.in_proj_bias"][2 * D :])
        weights = src[dec + "cross_attn.attention_weights.bias"]
        self.assert_same(layer.cross_attn.attention_weights.bias, weights)
        # Official norm1 follows the cross-attention, norm2 the self-attention.
        self.assert_same(layer.norm1.weight, src[dec + "norm2.weight"])
        self.assert_same(layer.norm2.weight, src[dec + "norm1.weight"])
        self.assert_same(layer.norm3.bias, src[dec + "norm3.bias"])
        self.assert_same(t.level_embed, src["transformer.level_embed"])
        self.assert_same(model.input_proj[3][0].weight, src["input_proj.3.0.weight"])
        self.assert_same(model.input_proj[1][1].bias, src["input_proj.1.1.bias"])
        self.assert_same(model.query_embed.weight, src["query_embed.weight"])
        self.assert_same(model.reference_points.weight, src["transformer.reference_points.weight"])
        self.assert_same(model.class_embed.weight, src["class_embed.0.weight"])  # shared heads
        self.assert_same(model.bbox_embed.layers[2].bias, src["bbox_embed.1.layers.2.bias"])
        downsample = src["backbone.0.body.layer3.0.downsample.1.running_var"]
        self.assert_same(model.backbone.res4[0].shortcut.norm.running_var, downsample)
        conv3 = src["backbone.0.body.layer4.2.conv3.weight"]
        self.assert_same(model.backbone.res5[2].conv3.weight, conv3)
        for key, value in initial_box_pos_head(D).items():  # deterministic, never random
            self.assert_same(model.state_dict()[key], value)

    def test_full_size_two_stage_recipe(self):
        """R50, d 256, 6 + 6 layers, 8 heads, 4 points, COCO's 91 slots: the recipe config."""
        recipe = os.path.join(
            REPO_ROOT, "configs", "deformable_detr", "deformable_detr_two_stage_R_50_50ep_coco.yaml"
        )
        keys = fixtures.deformable_detr_keys(
            d=256, ffn=1024, enc=6, dec=6, heads=8, points=4, refine=True, two_stage=True, depth=50
        )
        src = synthetic(keys)
        cfg = make_cfg("MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", path=recipe)
        state = CHECKPOINT_CONVERTERS["deformable_detr"](src, cfg)
        check_state_dict_keys(state, build_model(cfg).state_dict())
        ids = torch.tensor(coco_category_ids())
        self.assert_same(state["class_embed.5.weight"], src["class_embed.5.weight"][ids])
        self.assert_same(state["class_embed.6.bias"], src["class_embed.6.bias"][:80])

    def test_box_refine_keeps_per_layer_heads(self):
        keys = fixtures.deformable_detr_keys(class_rows=5, refine=True)
        src, model = self.convert_and_load("deformable_detr", keys, *REFINE)
        self.assertFalse(torch.equal(src["class_embed.0.weight"], src["class_embed.1.weight"]))
        for i in range(2):
            self.assert_same(model.class_embed[i].bias, src[f"class_embed.{i}.bias"])
            box = src[f"bbox_embed.{i}.layers.0.weight"]
            self.assert_same(model.bbox_embed[i].layers[0].weight, box)

    def test_two_stage_layers_and_coco_mapping(self):
        keys = fixtures.deformable_detr_keys(refine=True, two_stage=True)
        src, model = self.convert_and_load("deformable_detr", keys, *REFINE, *TWO_STAGE, *COCO80)
        proposals, query = model.encoder_proposals, model.proposal_query
        self.assert_same(proposals.enc_output.weight, src["transformer.enc_output.weight"])
        self.assert_same(proposals.enc_output_norm.bias, src["transformer.enc_output_norm.bias"])
        self.assert_same(query.pos_trans.weight, src["transformer.pos_trans.weight"])
        self.assert_same(query.pos_trans_norm.weight, src["transformer.pos_trans_norm.weight"])
        self.assertFalse(hasattr(model, "query_embed") or hasattr(model, "box_pos_head"))
        # Decoder heads: category-id slot 13 (stop sign) -> class 11, 90 (toothbrush) -> 79.
        self.assertEqual(tuple(model.class_embed[1].weight.shape), (80, D))
        self.assert_same(model.class_embed[1].weight[11], src["class_embed.1.weight"][13])
        self.assert_same(model.class_embed[0].bias[79], src["class_embed.0.bias"][90])
        # The proposal head keeps row 0, its class-agnostic score: rows are cut, not mapped.
        self.assert_same(model.class_embed[2].weight, src["class_embed.2.weight"][:80])
        self.assert_same(model.class_embed[2].bias[0], src["class_embed.2.bias"][0])
        self.assert_same(model.bbox_embed[2].layers[1].bias, src["bbox_embed.2.layers.1.bias"])

    def test_single_stage_coco_mapping_and_keep(self):
        keys = fixtures.deformable_detr_keys(class_rows=91)
        src, model = self.convert_and_load("deformable_detr", keys, *COCO80)
        self.assert_same(model.class_embed.weight[0], src["class_embed.0.weight"][1])  # person
        self.assert_same(model.class_embed.bias[11], src["class_embed.0.bias"][13])
        with self.assertRaisesRegex(ValueError, r"class_embed\.weight has 91 rows .* expects 80"):
            CHECKPOINT_CONVERTERS["deformable_detr"](src, make_cfg(*COCO80), coco_classes="keep")

    def test_variant_mismatches_name_the_fix(self):
        convert = CHECKPOINT_CONVERTERS["deformable_detr"]
        keys = fixtures.deformable_detr_keys(class_rows=5, refine=True, two_stage=True)
        two_stage = synthetic(keys)
        with self.assertRaisesRegex(ValueError, r"two-stage .*TWO_STAGE is False; set it True"):
            convert(two_stage, make_cfg(*REFINE))
        plain = synthetic(fixtures.deformable_detr_keys(class_rows=5))
        with self.assertRaisesRegex(ValueError, r"single-stage .*query_embed.*set it False"):
            convert(plain, make_cfg(*REFINE, *TWO_STAGE))
        with self.assertRaisesRegex(ValueError, r"not box-refined .*WITH_BOX_REFINE is True"):
            convert(plain, make_cfg(*REFINE))
        refined = synthetic(fixtures.deformable_detr_keys(class_rows=5, refine=True))
        with self.assertRaisesRegex(ValueError, r"box-refined .*WITH_BOX_REFINE is False"):
            convert(refined, make_cfg())
        detr_config = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")
        with self.assertRaisesRegex(ValueError, "needs a DeformableDETR config"):
            convert(plain, make_cfg(path=detr_config))
        detr = synthetic(checkpoint_keys.detr_keys(class_rows=6))
        with self.assertRaisesRegex(ValueError, "no transformer.level_embed"):
            convert(detr, make_cfg())

    def test_bad_checkpoints_name_the_keys(self):
        convert, cfg = CHECKPOINT_CONVERTERS["deformable_detr"], make_cfg()
        src = synthetic(fixtures.deformable_detr_keys(class_rows=5))
        extra = dict(src, **{"transformer.decoder.extra.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ValueError, r"unknown key.*transformer\.decoder\.extra\.we"):
            convert(extra, cfg)
        wrong_classes = synthetic(fixtures.deformable_detr_keys(class_rows=7))
        with self.assertRaisesRegex(ValueError, r"class_embed\.weight has 7 rows .* expects 5"):
            convert(wrong_classes, cfg)
        narrow = synthetic(fixtures.deformable_detr_keys(d=32, class_rows=5))
        with self.assertRaisesRegex(ValueError, r"hidden size: input_proj\.0\.0\.weight .*=64"):
            convert(narrow, cfg)
        more_points = synthetic(fixtures.deformable_detr_keys(points=4, class_rows=5))
        with self.assertRaisesRegex(ValueError, r"attention_weights\.weight has 64 rows .*ENC_N"):
            convert(more_points, cfg)
        wider = synthetic(fixtures.deformable_detr_keys(ffn=256, class_rows=5))
        with self.assertRaisesRegex(ValueError, r"linear1\.weight is \(256, 64\).*FEEDFORWARD"):
            convert(wider, cfg)
        deeper = synthetic(fixtures.deformable_detr_keys(dec=3, class_rows=5))
        with self.assertRaisesRegex(ValueError, r"class_embed\.\[0, 1, 2\] .*DEC_LAYERS=2"):
            convert(deeper, cfg)
        unshared = dict(src, **{"class_embed.1.bias": torch.zeros(5)})
        with self.assertRaisesRegex(ValueError, r"class_embed\.1 differs from class_embed\.0"):
            convert(unshared, cfg)
        refined = synthetic(fixtures.deformable_detr_keys(class_rows=5, refine=True))
        untied = dict(refined, **{T + "decoder.bbox_embed.1.layers.0.bias": torch.zeros(D)})
        with self.assertRaisesRegex(ValueError, r"transformer\.decoder\.bbox_embed\.1\.layers\.0"):
            convert(untied, make_cfg(*REFINE))
        missing = {k: v for k, v in src.items() if "encoder.layers.1.norm2" not in k}
        state = convert(missing, cfg)
        with self.assertRaisesRegex(ValueError, r"missing \(2\).*encoder\.layers\.1\.norm2\.bias"):
            check_state_dict_keys(state, build_model(cfg).state_dict())


class TestDetrexDeformableDETR(_DeformableImportCase):
    def test_plain(self):
        keys = fixtures.detrex_deformable_detr_keys(class_rows=5)
        src, model = self.convert_and_load("detrex", keys)
        t = model.transformer
        enc = "transformer.encoder.layers.0."
        value = src[enc + "attentions.0.value_proj.weight"]
        self.assert_same(t.encoder.layers[0].self_attn.value_proj.weight, value)
        self.assert_same(t.encoder.layers[0].norm2.bias, src[enc + "norms.1.bias"])
        dec = "transformer.decoder.layers.1."
        layer = t.decoder.layers[1]
        packed = src[dec + "attentions.0.attn.in_proj_weight"]
        self.assert_same(layer.self_attn.k_proj.weight, packed[D : 2 * D])
        offsets = src[dec + "attentions.1.sampling_offsets.bias"]
        self.assert_same(layer.cross_attn.sampling_offsets.bias, offsets)
        self.assert_same(layer.norm1.weight, src[dec + "norms.0.weight"])  # after self-attention
        self.assert_same(layer.norm2.weight, src[dec + "norms.1.weight"])
        self.assert_same(layer.ffn.linear1.weight, src[dec + "ffns.0.layers.0.0.weight"])
        self.assert_same(t.level_embed, src["transformer.level_embeds"])
        self.assert_same(model.input_proj[2][0].weight, src["neck.convs.2.conv.weight"])
        self.assert_same(model.input_proj[3][0].weight, src["neck.extra_convs.0.conv.weight"])
        self.assert_same(model.input_proj[3][1].bias, src["neck.extra_convs.0.norm.bias"])
        self.assert_same(model.query_embed.weight, src["query_embedding.weight"])
        shortcut = src["backbone.res3.0.shortcut.weight"]
        self.assert_same(model.backbone.res3[0].shortcut.weight, shortcut)

    def test_box_refine_two_stage_with_misspelled_norm(self):
        keys = fixtures.detrex_deformable_detr_keys(
            refine=True, two_stage=True, norm_name="enc_outpout_norm"
        )
        src, model = self.convert_and_load("detrex", keys, *REFINE, *TWO_STAGE, *COCO80)
        norm = src["transformer.enc_outpout_norm.weight"]
        self.assert_same(model.encoder_proposals.enc_output_norm.weight, norm)
        self.assert_same(model.proposal_query.pos_trans.bias, src["transformer.pos_trans.bias"])
        self.assert_same(model.class_embed[2].weight, src["class_embed.2.weight"])  # already 80
        self.assert_same(model.bbox_embed[1].layers[2].weight, src["bbox_embed.1.layers.2.weight"])

    def test_architecture_is_checked_against_the_keys(self):
        convert = CHECKPOINT_CONVERTERS["detrex"]
        deformable = synthetic(fixtures.detrex_deformable_detr_keys(class_rows=5))
        dab_config = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
        with self.assertRaisesRegex(ValueError, "is a Deformable DETR .*not DABDETR"):
            convert(deformable, make_cfg(path=dab_config))
        dab = synthetic(checkpoint_keys.detrex_dab_detr_keys(class_rows=5))
        with self.assertRaisesRegex(ValueError, "not a detrex Deformable DETR checkpoint"):
            convert(dab, make_cfg())
        keys = fixtures.detrex_deformable_detr_keys(class_rows=5, refine=True, two_stage=True)
        with self.assertRaisesRegex(ValueError, r"two-stage .*transformer\.enc_output"):
            convert(synthetic(keys), make_cfg(*REFINE))


class TestCLI(unittest.TestCase):
    def test_round_trip(self):
        cli = load_convert_checkpoint_cli()
        self.assertIn("deformable_detr", cli.SOURCES)
        with tempfile.TemporaryDirectory() as tmp:
            src_path, out = os.path.join(tmp, "official.pth"), os.path.join(tmp, "ours.pth")
            state = synthetic(fixtures.deformable_detr_keys(refine=True))
            torch.save({"model": state, "epoch": 49, "args": None}, src_path)
            opts = ["MODEL.DETR.NUM_CLASSES", "80", "MODEL.DETR.DEFORMABLE.WITH_BOX_REFINE", "True"]
            args = ["--source", "deformable_detr", "--config-file", CONFIG, src_path, out]
            cli.main(args + opts)
            model = build_model(make_cfg(*opts))
            assert_loads_strictly(self, model, out)
            head = model.class_embed[1].weight
            self.assertTrue(torch.equal(head[79].detach(), state["class_embed.1.weight"][90]))
            layer = model.transformer.decoder.layers[1]
            norm = state["transformer.decoder.layers.1.norm1.bias"]
            self.assertTrue(torch.equal(layer.norm2.bias.detach(), norm))
            with self.assertRaisesRegex(ValueError, "WITH_BOX_REFINE is False; set it True"):
                cli.main(["--overwrite"] + args + ["MODEL.DETR.NUM_CLASSES", "80"])


if __name__ == "__main__":
    unittest.main()
