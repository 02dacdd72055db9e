# Copyright (c) kd_detr contributors.
"""IDEA-Research/DINO (``--source dino``) checkpoint import: a synthetic state dict built from
the key/shape fixture (read from the reference code) converts and loads strictly into the tiny
DINO; spot checks of renamed, split, swapped, shared and class-mapped tensors; clear errors."""
import os
import unittest

import torch

from detectron2.modeling import build_model

from kd_detr.checkpoint import CHECKPOINT_CONVERTERS, check_state_dict_keys
from kd_detr.checkpoint.coco_classes import coco_category_ids

from .common import REPO_ROOT
from .fixtures.dino_checkpoint_keys import official_dino_keys
from .model_helpers import config_from

CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml")


def make_cfg(*opts):
    return config_from(CONFIG, "MODEL.DETR.NUM_CLASSES", "80", *opts, freeze=True)


def synthetic_official(**kwargs):
    """Random tensors with the fixture's shapes; the repeated heads get equal copies."""
    gen = torch.Generator().manual_seed(0)
    keys = official_dino_keys(**kwargs)
    state = {k: torch.randn(shape, generator=gen) for k, shape in keys.items()}
    for key in state:
        for head in ("class_embed.", "bbox_embed."):
            if key.startswith(head) or key.startswith("transformer.decoder." + head):
                rest = key.split(head, 1)[1].split(".", 1)[1]
                state[key] = state[f"{head}0.{rest}"].clone()
    return {"model": state}


class TestOfficialDINO(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.source = synthetic_official()
        cls.cfg = make_cfg()
        cls.state = CHECKPOINT_CONVERTERS["dino"](cls.source, cls.cfg)
        cls.model = build_model(cls.cfg)

    def test_converts_and_loads_strictly(self):
        check_state_dict_keys(self.state, self.model.state_dict())
        self.model.load_state_dict(self.state, strict=True)
        src, ours = self.source["model"], dict(self.model.named_parameters())
        same = {
            "tgt_embed.weight": "transformer.tgt_embed.weight",
            "transformer.level_embed": "transformer.level_embed",
            # DINO's decoder norm1 follows the cross-attention: kd_detr's norm2
            "transformer.decoder.layers.1.norm2.weight":
                "transformer.decoder.layers.1.norm1.weight",
            "transformer.decoder.layers.1.norm1.bias": "transformer.decoder.layers.1.norm2.bias",
            "transformer.decoder.ref_point_head.layers.0.weight":
                "transformer.decoder.ref_point_head.layers.0.weight",
            "transformer.decoder.norm.weight": "transformer.decoder.norm.weight",
            "encoder_proposals.enc_output_norm.bias": "transformer.enc_output_norm.bias",
            "enc_bbox_embed.layers.2.weight": "transformer.enc_out_bbox_embed.layers.2.weight",
            "bbox_embed.layers.1.bias": "bbox_embed.1.layers.1.bias",  # shared head
            "input_proj.3.0.weight": "input_proj.3.0.weight",
            "transformer.encoder.layers.0.self_attn.sampling_offsets.weight":
                "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        }  # fmt: skip
        for our_key, their_key in same.items():
            self.assertTrue(torch.equal(ours[our_key].detach(), src[their_key]), our_key)
        # packed q/k/v of the self-attention split in order
        packed = src["transformer.decoder.layers.0.self_attn.in_proj_weight"]
        for i, name in enumerate("qkv"):
            ours_w = ours[f"transformer.decoder.layers.0.self_attn.{name}_proj.weight"].detach()
            self.assertTrue(torch.equal(ours_w, packed[i * 64 : (i + 1) * 64]), name)

    def test_coco_91_slots_map_to_80_classes(self):
        src, ids = self.source["model"], coco_category_ids()
        # Detectron2 class 0 is person (id 1), class 79 toothbrush (id 90)
        for c in (0, 11, 79):
            for ours, theirs in (
                ("class_embed.weight", "class_embed.0.weight"),
                ("enc_class_embed.bias", "transformer.enc_out_class_embed.bias"),
            ):
                self.assertTrue(torch.equal(self.state[ours][c], src[theirs][ids[c]]))
        label = self.state["denoising.label_enc.weight"]
        self.assertEqual(tuple(label.shape), (81, 64))
        self.assertTrue(torch.equal(label[80], src["label_enc.weight"][91]))  # the extra row
        self.assertTrue(torch.equal(label[79], src["label_enc.weight"][90]))

    def test_without_denoising_the_label_embedding_is_dropped(self):
        cfg = make_cfg("MODEL.DETR.DN.ENABLED", "False")
        state = CHECKPOINT_CONVERTERS["dino"](self.source, cfg)
        build_model(cfg).load_state_dict(state, strict=True)

    def test_clear_errors(self):
        bad = dict(self.source["model"], **{"transformer.foo.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ValueError, "transformer.foo.weight"):
            CHECKPOINT_CONVERTERS["dino"](bad, self.cfg)
        untied = dict(self.source["model"])
        untied["class_embed.1.bias"] = untied["class_embed.1.bias"] + 1
        with self.assertRaisesRegex(ValueError, r"class_embed\.1\.bias"):
            CHECKPOINT_CONVERTERS["dino"](untied, self.cfg)
        with self.assertRaisesRegex(ValueError, "HIDDEN_DIM"):
            CHECKPOINT_CONVERTERS["dino"](self.source, make_cfg("MODEL.DETR.HIDDEN_DIM", "96"))
        with self.assertRaisesRegex(ValueError, "NUM_QUERIES"):
            CHECKPOINT_CONVERTERS["dino"](self.source, make_cfg("MODEL.DETR.NUM_QUERIES", "12"))
        with self.assertRaisesRegex(ValueError, "NUM_CLASSES=5"):
            CHECKPOINT_CONVERTERS["dino"](self.source, make_cfg("MODEL.DETR.NUM_CLASSES", "5"))
        with self.assertRaisesRegex(ValueError, "not an IDEA-Research/DINO"):
            src = {k: v for k, v in self.source["model"].items() if "enc_out" not in k}
            CHECKPOINT_CONVERTERS["dino"](src, self.cfg)


if __name__ == "__main__":
    unittest.main()
