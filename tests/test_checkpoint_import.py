# Copyright (c) kd_detr contributors.
"""Official (facebookresearch/detr, IDEA-Research/DAB-DETR, DN-DAB-DETR) and detrex checkpoint
import: synthetic state dicts built from the key/shape fixtures convert and load strictly, values
land in the right places, COCO's 91 category-id slots map to Detectron2's 80 classes, and bad
checkpoints give errors naming the keys."""
import os
import tempfile
import unittest

import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from kd_detr.checkpoint import (
    CHECKPOINT_CONVERTERS,
    check_state_dict_keys,
    register_checkpoint_converter,
)
from kd_detr.checkpoint.coco_classes import coco_category_ids

from .common import REPO_ROOT
from .fixtures import checkpoint_keys as fixtures
from .hf_reference import load_convert_checkpoint_cli
from .model_helpers import assert_loads_strictly, config_from

torch.set_num_threads(1)
DETR_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")
DAB_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
COCO80 = ("MODEL.DETR.NUM_CLASSES", "80")
DN = ("MODEL.DETR.DN.ENABLED", "True")
D = 64


def make_cfg(path, *opts):
    return config_from(path, *opts, freeze=True)


def synthetic(keys, seed=0):
    """Random tensors with the fixture's shapes; duplicated modules get equal copies."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) for k, shape in keys.items()}
    for key in state:
        if key.startswith("transformer.decoder.bbox_embed."):
            state[key] = state[key[len("transformer.decoder.") :]].clone()
        if key.endswith("ffns.0.layers.0.1.weight"):
            state[key] = state[key.replace("layers.0.1", "activation")].clone()
    return state


class _ImportCase(unittest.TestCase):
    def load(self, state, cfg):
        """Strictly load ``state`` into the model of ``cfg``; returns the model."""
        model = build_model(cfg)
        check_state_dict_keys(state, model.state_dict())
        model.load_state_dict(state, strict=True)
        return model

    def assert_same(self, ours, theirs):
        self.assertTrue(torch.equal(ours.detach(), theirs), f"{tuple(ours.shape)}")


class TestOfficialDETR(_ImportCase):
    def test_converts_and_loads_strictly(self):
        src = synthetic(fixtures.detr_keys(class_rows=6))
        cfg = make_cfg(DETR_CONFIG)
        model = self.load(CHECKPOINT_CONVERTERS["detr"](src, cfg), cfg)
        enc, dec = model.transformer.encoder.layers[1], model.transformer.decoder.layers[2]
        packed = src["transformer.encoder.layers.1.self_attn.in_proj_weight"]
        self.assert_same(enc.self_attn.q_proj.weight, packed[:D])
        self.assert_same(enc.self_attn.k_proj.weight, packed[D : 2 * D])
        self.assert_same(enc.self_attn.v_proj.weight, packed[2 * D :])
        bias = src["transformer.decoder.layers.2.multihead_attn.in_proj_bias"]
        self.assert_same(dec.cross_attn.v_proj.bias, bias[2 * D :])
        self.assert_same(dec.ffn.linear2.weight, src["transformer.decoder.layers.2.linear2.weight"])
        self.assert_same(dec.norm3.bias, src["transformer.decoder.layers.2.norm3.bias"])
        self.assert_same(model.query_embed.weight, src["query_embed.weight"])
        res3 = model.backbone.res3[0]
        self.assert_same(res3.shortcut.weight, src["backbone.0.body.layer2.0.downsample.0.weight"])
        var = src["backbone.0.body.layer2.0.downsample.1.running_var"]
        self.assert_same(res3.shortcut.norm.running_var, var)
        self.assert_same(model.class_embed.weight, src["class_embed.weight"])

    def test_coco_91_slots_map_to_80_classes(self):
        src = synthetic(fixtures.detr_keys(class_rows=92))
        cfg = make_cfg(DETR_CONFIG, *COCO80)
        model = self.load(CHECKPOINT_CONVERTERS["detr"](src, cfg), cfg)
        weight, bias = model.class_embed.weight, model.class_embed.bias
        self.assertEqual(tuple(weight.shape), (81, D))
        ids = coco_category_ids()
        self.assertEqual((ids[11], ids[79]), (13, 90))  # stop sign, toothbrush
        self.assert_same(weight[11], src["class_embed.weight"][13])
        self.assert_same(bias[79], src["class_embed.bias"][90])
        self.assert_same(weight[80], src["class_embed.weight"][91])  # no object stays last
        with self.assertRaisesRegex(ValueError, r"class_embed\.weight has 92 rows .* expects 81"):
            CHECKPOINT_CONVERTERS["detr"](src, cfg, coco_classes="keep")

    def test_coco_ids_are_detectron2_contiguous_order(self):
        mapping = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
        self.assertEqual({i: c for c, i in enumerate(coco_category_ids())}, mapping)


class TestOfficialDABDETR(_ImportCase):
    def test_converts_and_loads_strictly(self):
        src = synthetic(fixtures.dab_detr_keys(class_rows=5))
        cfg = make_cfg(DAB_CONFIG)
        model = self.load(CHECKPOINT_CONVERTERS["dab_detr"](src, cfg), cfg)
        t = model.transformer
        packed = src["transformer.encoder.layers.0.self_attn.in_proj_bias"]
        self.assert_same(t.encoder_layers[0].self_attn.k_proj.bias, packed[D : 2 * D])
        prelu = src["transformer.encoder.layers.1.activation.weight"]
        self.assert_same(t.encoder_layers[1].ffn.activation.weight, prelu)
        scale = src["transformer.encoder.query_scale.layers.1.weight"]
        self.assert_same(t.encoder_query_scale.layers[1].weight, scale)
        layer0, layer1 = t.decoder.layers
        dec = "transformer.decoder.layers."
        self.assert_same(layer0.ca_qpos_proj.weight, src[dec + "0.ca_qpos_proj.weight"])
        self.assertIsNone(layer1.ca_qpos_proj)
        out = src["transformer.decoder.layers.1.cross_attn.out_proj.weight"]
        self.assert_same(layer1.cross_attn_out_proj.weight, out)
        self.assert_same(layer1.sa_v_proj.bias, src["transformer.decoder.layers.1.sa_v_proj.bias"])
        self.assert_same(layer1.ffn.activation.weight, src[dec + "1.activation.weight"])
        anchor_head = src["transformer.decoder.ref_anchor_head.layers.1.bias"]
        self.assert_same(t.decoder.ref_anchor_head.layers[1].bias, anchor_head)
        self.assert_same(model.refpoint_embed.weight, src["refpoint_embed.weight"])
        self.assert_same(model.bbox_embed.layers[2].weight, src["bbox_embed.layers.2.weight"])

    def test_dn_dab_detr_label_embedding_and_coco_mapping(self):
        src = synthetic(fixtures.dab_detr_keys(class_rows=91, label_rows=92))
        cfg = make_cfg(DAB_CONFIG, *COCO80, *DN)
        model = self.load(CHECKPOINT_CONVERTERS["dab_detr"](src, cfg), cfg)
        label_enc = model.denoising.label_enc.weight
        self.assertEqual(tuple(label_enc.shape), (81, D - 1))
        self.assert_same(label_enc[0], src["label_enc.weight"][1])  # person, id 1
        self.assert_same(label_enc[79], src["label_enc.weight"][90])
        self.assert_same(label_enc[80], src["label_enc.weight"][91])  # "no object"
        self.assert_same(model.class_embed.weight[79], src["class_embed.weight"][90])
        with self.assertRaisesRegex(ValueError, "MODEL.DETR.DN.ENABLED True"):
            CHECKPOINT_CONVERTERS["dab_detr"](src, make_cfg(DAB_CONFIG, *COCO80))

    def test_bad_checkpoints_name_the_keys(self):
        cfg, convert = make_cfg(DAB_CONFIG), CHECKPOINT_CONVERTERS["dab_detr"]
        src = synthetic(fixtures.dab_detr_keys(class_rows=5))
        with self.assertRaisesRegex(ValueError, "unknown key.*transformer.encoder.extra.weight"):
            convert(dict(src, **{"transformer.encoder.extra.weight": torch.zeros(1)}), cfg)
        untied = dict(src)
        untied["transformer.decoder.bbox_embed.layers.0.bias"] = torch.zeros(D)
        with self.assertRaisesRegex(ValueError, r"transformer.decoder.bbox_embed.layers.0.bias"):
            convert(untied, cfg)
        narrow = synthetic(fixtures.dab_detr_keys(d=32, class_rows=5))
        with self.assertRaisesRegex(ValueError, r"hidden size: input_proj.weight .*HIDDEN_DIM=64"):
            convert(narrow, cfg)
        wrong_classes = synthetic(fixtures.dab_detr_keys(class_rows=7))
        with self.assertRaisesRegex(ValueError, r"class_embed.weight has 7 rows .* expects 5"):
            convert(wrong_classes, cfg)
        with self.assertRaisesRegex(ValueError, "needs a DABDETR config"):
            convert(src, make_cfg(DETR_CONFIG))
        missing = convert({k: v for k, v in src.items() if "ref_anchor_head" not in k}, cfg)
        with self.assertRaisesRegex(ValueError, r"missing \(4\).*ref_anchor_head.layers.0.bias"):
            check_state_dict_keys(missing, build_model(cfg).state_dict())


class TestDetrex(_ImportCase):
    def test_detr(self):
        src = synthetic(fixtures.detrex_detr_keys(class_rows=81))
        cfg = make_cfg(DETR_CONFIG, *COCO80)
        model = self.load(CHECKPOINT_CONVERTERS["detrex"](src, cfg), cfg)
        dec = model.transformer.decoder
        packed = src["transformer.decoder.layers.1.attentions.1.attn.in_proj_weight"]
        self.assert_same(dec.layers[1].cross_attn.q_proj.weight, packed[:D])
        layers = "transformer.decoder.layers."
        self.assert_same(dec.layers[1].norm3.weight, src[layers + "1.norms.2.weight"])
        self.assert_same(dec.layers[0].ffn.linear1.bias, src[layers + "0.ffns.0.layers.0.0.bias"])
        self.assert_same(dec.norm.weight, src["transformer.decoder.post_norm_layer.weight"])
        shortcut = src["backbone.res5.0.shortcut.norm.bias"]
        self.assert_same(model.backbone.res5[0].shortcut.norm.bias, shortcut)
        self.assert_same(model.class_embed.weight, src["class_embed.weight"])  # already 80 + 1

    def test_dab_detr_with_dn_label_encoder(self):
        src = synthetic(fixtures.detrex_dab_detr_keys(class_rows=80, label_rows=81))
        cfg = make_cfg(DAB_CONFIG, *COCO80, *DN)
        model = self.load(CHECKPOINT_CONVERTERS["detrex"](src, cfg), cfg)
        t = model.transformer
        enc = "transformer.encoder.layers.1."
        prelu = src[enc + "ffns.0.activation.weight"]
        self.assert_same(t.encoder_layers[1].ffn.activation.weight, prelu)
        self.assert_same(t.encoder_layers[1].norm2.bias, src[enc + "norms.1.bias"])
        dec = "transformer.decoder.layers.0."
        layer = t.decoder.layers[0]
        self.assert_same(layer.sa_kpos_proj.weight, src[dec + "attentions.0.key_pos_proj.weight"])
        sine = src[dec + "attentions.1.query_pos_sine_proj.bias"]
        self.assert_same(layer.ca_qpos_sine_proj.bias, sine)
        out = src[dec + "attentions.1.out_proj.weight"]
        self.assert_same(layer.cross_attn_out_proj.weight, out)
        self.assert_same(model.refpoint_embed.weight, src["anchor_box_embed.weight"])
        label = src["denoising_generator.label_encoder.weight"]
        self.assert_same(model.denoising.label_enc.weight, label)
        untied = dict(src, **{enc + "ffns.0.layers.0.1.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ValueError, "ffns.0.layers.0.1.weight"):
            CHECKPOINT_CONVERTERS["detrex"](untied, cfg)


class TestRegistryAndCLI(unittest.TestCase):
    def test_registry(self):
        self.assertTrue({"hf", "detr", "dab_detr", "detrex"} <= set(CHECKPOINT_CONVERTERS))
        with self.assertRaises(KeyError):
            register_checkpoint_converter("detr")(lambda source, cfg, coco_classes="auto": {})

    def test_cli_writes_a_strictly_loadable_checkpoint(self):
        cli = load_convert_checkpoint_cli()
        self.assertIn("dab_detr", cli.SOURCES)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "dn_dab_detr.pth")
            state = synthetic(fixtures.dab_detr_keys(label_rows=92))
            torch.save({"model": state, "epoch": 49}, src)
            out = os.path.join(tmp, "converted.pth")
            opts = ["MODEL.DETR.NUM_CLASSES", "80", "MODEL.DETR.DN.ENABLED", "True"]
            args = ["--source", "dab_detr", "--config-file", DAB_CONFIG, src, out]
            cli.main(args + opts)
            model = build_model(make_cfg(DAB_CONFIG, *opts))
            assert_loads_strictly(self, model, out)
            with self.assertRaisesRegex(ValueError, "label_enc"):  # DN checkpoint, no DN config
                cli.main(["--overwrite"] + args + ["MODEL.DETR.NUM_CLASSES", "80"])


if __name__ == "__main__":
    unittest.main()
