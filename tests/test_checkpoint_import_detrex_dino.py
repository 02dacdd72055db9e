# Copyright (c) kd_detr contributors.
"""detrex DINO (``--source detrex`` with a DINO config) checkpoint import: a synthetic state dict
built from the key/shape fixture (read from detrex's code) converts and loads strictly into the
tiny DINO with per-layer heads (``MODEL.DETR.DINO.SHARE_HEADS False``); values land in place
(attention projections, sampling offsets, level embeddings, denoising label embedding, per-layer
and encoder heads, COCO's 91 slots -> 80 classes); the loaded model predicts with the source's
per-layer heads; identical copies load into a shared-head DINO, distinct ones give an error
telling to set SHARE_HEADS False; detrex's position encoding is checked; CLI round trip."""
import logging
import os
import tempfile
import unittest

import torch
import torch.nn.functional as F

from detectron2.modeling import build_model

from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, check_state_dict_keys
from kd_detr.checkpoint.coco_classes import coco_category_ids

from .common import REPO_ROOT
from .fixtures.deformable_checkpoint_keys import detrex_deformable_detr_keys
from .fixtures.detrex_dino_checkpoint_keys import detrex_dino_keys
from .hf_reference import load_convert_checkpoint_cli
from .model_helpers import assert_loads_strictly, config_from
from .test_dab_detr import synthetic_batch

torch.set_num_threads(1)
CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml")
DEFORMABLE_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "deformable_detr_tiny_parity.yaml")
# detrex's position encoding (temperature 10000, offset -0.5), 80 COCO classes
DETREX = (
    "MODEL.DETR.NUM_CLASSES", "80",
    "MODEL.DETR.POSITION_TEMPERATURE", "10000.0",
    "MODEL.DETR.DINO.POSITION_OFFSET", "-0.5",
)  # fmt: skip
PER_LAYER = ("MODEL.DETR.DINO.SHARE_HEADS", "False")
D = 64
DEC = "transformer.decoder.layers."
ENC = "transformer.encoder.layers."
LOGGER = "kd_detr.checkpoint.detrex_dino"


def make_cfg(*opts, path=CONFIG):
    return config_from(path, *opts, freeze=True)


def synthetic(keys, identical_layers=False, seed=0):
    """Random tensors with the fixture's shapes; ``transformer.decoder.*_embed.i`` equal the
    top-level heads (the same modules); ``identical_layers`` makes the decoder heads 0 .. L-1
    equal copies (the encoder head, last, stays different)."""
    gen = torch.Generator().manual_seed(seed)
    # small values and positive BatchNorm variances, so that a model runs on them without overflow
    state = {k: 0.1 * torch.randn(shape, generator=gen) for k, shape in keys.items()}
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 1.0
        name, index, *rest = key.split(".")
        if identical_layers and name in ("class_embed", "bbox_embed") and index != "2":
            state[key] = state[".".join([name, "0", *rest])].clone()
    for key in state:
        if key.startswith("transformer.decoder.class_embed.") or key.startswith(
            "transformer.decoder.bbox_embed."
        ):
            state[key] = state[key[len("transformer.decoder.") :]].clone()
    return state


def convert(state, *opts, **kwargs):
    return CHECKPOINT_CONVERTERS["detrex"](state, make_cfg(*opts), **kwargs)


class TestDetrexDINO(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.src = synthetic(detrex_dino_keys())
        cls.cfg = make_cfg(*DETREX, *PER_LAYER)
        cls.state = CHECKPOINT_CONVERTERS["detrex"]({"model": cls.src}, cls.cfg)
        torch.manual_seed(0)
        cls.model = build_model(cls.cfg).eval()
        check_state_dict_keys(cls.state, cls.model.state_dict())
        cls.model.load_state_dict(cls.state, strict=True)

    def assert_same(self, ours, key):
        self.assertTrue(torch.equal(ours.detach(), self.src[key]), key)

    def test_layers_land_in_place(self):
        layer, src = self.model.transformer.decoder.layers[1], self.src
        packed = src[DEC + "1.attentions.0.attn.in_proj_weight"]
        for i, proj in enumerate((layer.self_attn.q_proj, layer.self_attn.k_proj,
                                  layer.self_attn.v_proj)):  # fmt: skip
            self.assertTrue(torch.equal(proj.weight.detach(), packed[i * D : (i + 1) * D]))
        bias = src[DEC + "1.attentions.0.attn.in_proj_bias"]
        self.assertTrue(torch.equal(layer.self_attn.k_proj.bias.detach(), bias[D : 2 * D]))
        same = {
            # decoder self-attention (nn.MultiheadAttention) and deformable cross-attention
            DEC + "1.self_attn.out_proj.weight": DEC + "1.attentions.0.attn.out_proj.weight",
            DEC + "1.cross_attn.sampling_offsets.weight":
                DEC + "1.attentions.1.sampling_offsets.weight",
            DEC + "1.cross_attn.attention_weights.bias":
                DEC + "1.attentions.1.attention_weights.bias",
            DEC + "1.cross_attn.value_proj.weight": DEC + "1.attentions.1.value_proj.weight",
            DEC + "1.cross_attn.output_proj.bias": DEC + "1.attentions.1.output_proj.bias",
            # detrex's norms follow the operation order self-attn, cross-attn, FFN (= ours)
            DEC + "1.norm1.weight": DEC + "1.norms.0.weight",
            DEC + "1.norm2.weight": DEC + "1.norms.1.weight",
            DEC + "1.norm3.bias": DEC + "1.norms.2.bias",
            DEC + "1.ffn.linear1.weight": DEC + "1.ffns.0.layers.0.0.weight",
            ENC + "0.self_attn.sampling_offsets.bias": ENC + "0.attentions.0.sampling_offsets.bias",
            ENC + "0.norm2.bias": ENC + "0.norms.1.bias",
            "transformer.level_embed": "transformer.level_embeds",
            "transformer.decoder.ref_point_head.layers.0.weight":
                "transformer.decoder.ref_point_head.layers.0.weight",
            "transformer.decoder.norm.bias": "transformer.decoder.norm.bias",
            "tgt_embed.weight": "transformer.tgt_embed.weight",
            "encoder_proposals.enc_output.weight": "transformer.enc_output.weight",
            "encoder_proposals.enc_output_norm.bias": "transformer.enc_output_norm.bias",
            "input_proj.3.0.weight": "neck.extra_convs.0.conv.weight",
            "input_proj.1.1.bias": "neck.convs.1.norm.bias",
            "backbone.res4.0.shortcut.norm.running_var":
                "backbone.res4.0.shortcut.norm.running_var",
        }  # fmt: skip
        ours = self.model.state_dict()
        for our_key, their_key in same.items():
            self.assert_same(ours[our_key], their_key)

    def test_heads_per_layer_and_encoder(self):
        model = self.model
        for i in range(2):
            self.assert_same(model.class_embed[i].weight, f"class_embed.{i}.weight")
            self.assert_same(model.bbox_embed[i].layers[2].bias, f"bbox_embed.{i}.layers.2.bias")
        # detrex's last head (index L = 2) scores and boxes the encoder proposals
        self.assert_same(model.enc_class_embed.bias, "class_embed.2.bias")
        self.assert_same(model.enc_bbox_embed.layers[0].weight, "bbox_embed.2.layers.0.weight")
        # denoising label embedding: detrex's 80 rows, then a zero "no object" row
        labels = model.denoising.label_enc.weight.detach()
        self.assertEqual(tuple(labels.shape), (81, D))
        self.assertTrue(torch.equal(labels[:80], self.src["label_enc.weight"]))
        self.assertTrue(torch.equal(labels[80], torch.zeros(D)))

    def test_loaded_model_predicts_with_the_sources_heads(self):
        model = self.model
        images = model.preprocess_image(synthetic_batch())
        with torch.no_grad():
            layers = model.forward_raw(images)["layers"]
        src, eps = self.src, self.cfg.MODEL.DETR.DEFORMABLE.INVERSE_SIGMOID_EPS

        def linear(x, name):
            return F.linear(x, src[name + ".weight"], src[name + ".bias"])

        for i in range(2):
            h, ref = layers["hidden_states"][i], layers["reference_boxes"][i].clamp(0, 1)
            logits = linear(h, f"class_embed.{i}")
            torch.testing.assert_close(layers["pred_logits"][i], logits, msg=f"layer {i}")
            other = linear(h, f"class_embed.{1 - i}")  # the other layer's head differs
            self.assertGreater((other - logits).abs().max().item(), 0.1)
            box = f"bbox_embed.{i}.layers."
            delta = linear(F.relu(linear(F.relu(linear(h, box + "0")), box + "1")), box + "2")
            ref_logit = torch.log(ref.clamp(min=eps) / (1 - ref).clamp(min=eps))
            boxes = (delta + ref_logit).sigmoid()
            torch.testing.assert_close(layers["pred_boxes"][i], boxes, msg=f"layer {i}")

    def test_coco_91_slots_map_to_80_classes(self):
        src = synthetic(detrex_dino_keys(class_rows=91))
        state = convert(src, *DETREX, *PER_LAYER)
        ids = coco_category_ids()
        for c in (0, 11, 79):  # person (id 1), stop sign (id 13), toothbrush (id 90)
            for ours, theirs in (
                ("class_embed.0.weight", "class_embed.0.weight"),
                ("class_embed.1.bias", "class_embed.1.bias"),
                ("enc_class_embed.weight", "class_embed.2.weight"),  # class-aware: by id too
                ("denoising.label_enc.weight", "label_enc.weight"),
            ):
                self.assertTrue(torch.equal(state[ours][c], src[theirs][ids[c]]), (ours, c))
        self.assertEqual(tuple(state["denoising.label_enc.weight"].shape), (81, D))
        self.assertTrue(torch.equal(state["denoising.label_enc.weight"][80], torch.zeros(D)))
        build_model(make_cfg(*DETREX, *PER_LAYER)).load_state_dict(state, strict=True)
        with self.assertRaisesRegex(ValueError, "class_embed.0.weight has 91 rows"):
            convert(src, *DETREX, *PER_LAYER, coco_classes="keep")

    def test_shared_head_config(self):
        with self.assertRaisesRegex(ValueError, "set MODEL.DETR.DINO.SHARE_HEADS False"):
            convert(self.src, *DETREX)
        same = synthetic(detrex_dino_keys(), identical_layers=True)
        state = convert(same, *DETREX)
        build_model(make_cfg(*DETREX)).load_state_dict(state, strict=True)
        self.assertTrue(torch.equal(state["class_embed.weight"], same["class_embed.1.weight"]))
        self.assertTrue(torch.equal(state["enc_class_embed.weight"], same["class_embed.2.weight"]))

    def test_position_encoding_warning(self):
        with self.assertLogs(LOGGER, logging.WARNING) as logs:
            convert(self.src, "MODEL.DETR.NUM_CLASSES", "80", *PER_LAYER)
        self.assertIn("MODEL.DETR.DINO.POSITION_OFFSET -0.5 (config: 0.0)", logs.output[0])
        self.assertNotIn("POSITION_TEMPERATURE", logs.output[0])  # the tiny config has 10000
        with self.assertNoLogs(LOGGER, logging.WARNING):
            convert(self.src, *DETREX, *PER_LAYER)

    def test_without_denoising_the_label_embedding_is_dropped(self):
        state = convert(self.src, *DETREX, *PER_LAYER, "MODEL.DETR.DN.ENABLED", "False")
        self.assertNotIn("denoising.label_enc.weight", state)
        cfg = make_cfg(*DETREX, *PER_LAYER, "MODEL.DETR.DN.ENABLED", "False")
        build_model(cfg).load_state_dict(state, strict=True)

    def test_clear_errors(self):
        opts = (*DETREX, *PER_LAYER)
        with self.assertRaisesRegex(ValueError, "transformer.foo.weight"):
            convert(dict(self.src, **{"transformer.foo.weight": torch.zeros(1)}), *opts)
        untied = dict(self.src)
        untied["transformer.decoder.bbox_embed.1.layers.0.bias"] = torch.zeros(D)
        with self.assertRaisesRegex(ValueError, r"transformer\.decoder\.bbox_embed\.1\.layers"):
            convert(untied, *opts)
        with self.assertRaisesRegex(ValueError, "DEC_LAYERS=3"):
            convert(self.src, *opts, "MODEL.DETR.DEC_LAYERS", "3")
        with self.assertRaisesRegex(ValueError, "HIDDEN_DIM"):
            convert(self.src, *opts, "MODEL.DETR.HIDDEN_DIM", "96")
        with self.assertRaisesRegex(ValueError, "NUM_QUERIES"):
            convert(self.src, *opts, "MODEL.DETR.NUM_QUERIES", "12")
        with self.assertRaisesRegex(ValueError, "NUM_CLASSES=5"):
            convert(self.src, *PER_LAYER)
        deformable = synthetic(detrex_deformable_detr_keys(refine=True, two_stage=True))
        with self.assertRaisesRegex(ValueError, "not a detrex DINO checkpoint"):
            convert(deformable, *opts)
        with self.assertRaisesRegex(ValueError, "is a DINO: use a DINO config"):
            CHECKPOINT_CONVERTERS["detrex"](self.src, make_cfg(path=DEFORMABLE_CONFIG))


class TestCLI(unittest.TestCase):
    def test_round_trip(self):
        cli = load_convert_checkpoint_cli()
        src = synthetic(detrex_dino_keys(class_rows=91))
        opts = [*DETREX, *PER_LAYER]
        with tempfile.TemporaryDirectory() as tmp:
            src_path, out = os.path.join(tmp, "detrex.pth"), os.path.join(tmp, "ours.pth")
            torch.save({"model": src, "iteration": 89999}, src_path)
            args = ["--source", "detrex", "--config-file", CONFIG, src_path, out]
            cli.main(args + opts)
            model = build_model(make_cfg(*opts))
            assert_loads_strictly(self, model, out)
            head = model.class_embed[1].weight.detach()
            self.assertTrue(torch.equal(head[79], src["class_embed.1.weight"][90]))
            with self.assertRaisesRegex(ValueError, "SHARE_HEADS False"):
                cli.main(["--overwrite"] + args + list(DETREX))


if __name__ == "__main__":
    unittest.main()
