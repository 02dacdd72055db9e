# Copyright (c) kd_detr contributors.
"""Open-vocabulary class head on DETR / DAB-DETR query features (MODEL.DETR.CLASS_HEAD
region_text)."""
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from kd_detr.config import load_config
from kd_detr.distill.losses import final_layer_targets, kd_detr_losses
from kd_detr.ov import QueryTextClassifier, set_detr_vocabulary
from kd_detr.ov.vocabulary import dataset_vocabulary, select_vocabulary
from tests.common import REPO_ROOT, shared_data

DAB_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "dab_detr_tiny_parity.yaml")
DETR_CONFIG = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")
DIM = 16


def _emb(num, seed):
    return torch.randn(num, DIM, generator=torch.Generator().manual_seed(seed)) * 2.0


def _batch():
    """Two images (64x96, 96x64) with boxes of classes 0..3."""
    gen = torch.Generator().manual_seed(0)
    batch = []
    for (h, w), boxes, classes in [
        ((64, 96), [[10, 8, 50, 40], [40, 20, 90, 60]], [1, 3]),
        ((96, 64), [[5, 30, 60, 90]], [0]),
    ]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        batch.append({"image": torch.rand(3, h, w, generator=gen) * 255, "instances": inst})
    return batch


class _Base(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.tmp = tempfile.mkdtemp(prefix="kd_ov_detr_")
        cls.train_text, cls.test_text = _emb(5, 1), _emb(7, 2)
        cls.train_path = os.path.join(cls.tmp, "train.npy")
        cls.test_path = os.path.join(cls.tmp, "test.npy")
        np.save(cls.train_path, cls.train_text.numpy())
        np.save(cls.test_path, cls.test_text.numpy())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def cfg(self, config, *opts):
        cfg = load_config(config, freeze=False, register_datasets=False)
        ov_opts = [
            "MODEL.DETR.NUM_CLASSES", "5", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
            "MODEL.DETR.CLASS_HEAD", "region_text", "MODEL.OV.EMBED_DIM", str(DIM),
            "MODEL.OV.TEXT_EMBEDDINGS", self.train_path,
            "MODEL.OV.TEST_TEXT_EMBEDDINGS", self.test_path, "MODEL.OV.TEMPERATURE", "0.02",
        ]  # fmt: skip
        cfg.merge_from_list(ov_opts + list(opts))
        return cfg

    def model(self, config, *opts, seed=0):
        torch.manual_seed(seed)
        model = build_model(self.cfg(config, *opts))
        with torch.no_grad():  # non-zero box heads, so that every box gradient is non-zero
            model.bbox_embed.layers[-1].weight.normal_(std=0.1)
        return model

    @staticmethod
    def by_hand(head, hs, text, temperature, bias=0.0):
        """cos(normalize(W h + b), normalize(t)) / T + bias, written out."""
        z = hs @ head.proj.weight.t() + head.proj.bias
        z = z / z.norm(dim=-1, keepdim=True)
        t = text / text.norm(dim=-1, keepdim=True)
        return z @ t.t() / temperature + bias


class TestDABDETRHead(_Base):
    def test_logits_equal_cosine_by_hand_and_vocabulary_follows_mode(self):
        model = self.model(DAB_CONFIG, "MODEL.OV.BACKGROUND", "none")
        head = model.class_embed
        self.assertIsInstance(head, QueryTextClassifier)
        prior = -float(np.log(99.0))
        self.assertAlmostEqual(head.bias.item(), prior, places=5)
        images = model.preprocess_image(_batch())
        for mode, text, num in ((True, self.train_text, 5), (False, self.test_text, 7)):
            model.train(mode)
            with torch.no_grad():
                out = model.forward_raw(images)
            hs, logits = out["layers"]["hidden_states"], out["layers"]["pred_logits"]
            self.assertEqual(tuple(logits.shape), (2, 2, 10, num))  # (L, B, Q, C)
            expected = self.by_hand(head, hs, text, 0.02, bias=head.bias.item())
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(out["pred_logits"], expected[-1], rtol=1e-5, atol=1e-4)

    def test_set_vocabulary_changes_classes_and_inference(self):
        model = self.model(DAB_CONFIG, "MODEL.OV.BACKGROUND", "none").eval()
        batch = _batch()
        with torch.no_grad():
            before = model(batch)
        self.assertTrue(all(int(r["instances"].pred_classes.max()) < 7 for r in before))
        set_detr_vocabulary(model, _emb(3, 5))
        self.assertEqual(model.class_embed.num_classes, 3)
        with torch.no_grad():
            raw = model.forward_raw(model.preprocess_image(batch))
            after = model(batch)
        self.assertEqual(raw["pred_logits"].shape[-1], 3)
        for result in after:
            classes = result["instances"].pred_classes
            self.assertEqual(len(classes), 20)  # TEST_TOPK over (query, class) pairs
            self.assertTrue(bool(((classes >= 0) & (classes < 3)).all()))
        with self.assertRaisesRegex(ValueError, "text dimension 16"):
            set_detr_vocabulary(model, torch.randn(4, 32))

    def test_checkpoint_has_no_vocabulary(self):
        model = self.model(DAB_CONFIG, "MODEL.OV.BACKGROUND", "none").eval()
        state = model.state_dict()
        head_keys = sorted(k for k in state if k.startswith("class_embed."))
        self.assertEqual(head_keys, ["class_embed.bias", "class_embed.proj.bias",
                                     "class_embed.proj.weight"])  # fmt: skip
        other = self.model(DAB_CONFIG, "MODEL.OV.BACKGROUND", "none", seed=3).eval()
        other.load_state_dict(state)  # strict: no vocabulary key missing or unexpected
        set_detr_vocabulary(other, _emb(4, 9))
        set_detr_vocabulary(model, _emb(4, 9))
        images = model.preprocess_image(_batch())
        with torch.no_grad():
            torch.testing.assert_close(
                other.forward_raw(images)["pred_logits"], model.forward_raw(images)["pred_logits"]
            )

    def test_training_step_gradients_and_kd(self):
        model = self.model(DAB_CONFIG, "MODEL.OV.BACKGROUND", "none").train()
        losses = model(_batch())
        self.assertIn("loss_class", losses)
        total = sum(losses.values())
        self.assertTrue(torch.isfinite(total))
        total.backward()
        head = model.class_embed
        self.assertGreater(head.proj.weight.grad.abs().sum().item(), 0)
        self.assertGreater(head.bias.grad.abs().item(), 0)
        for vocab in (head.train_vocabulary, head.test_vocabulary):
            self.assertFalse(vocab.requires_grad)
            self.assertIsNone(vocab.grad)
        param_ids = {id(p) for p in model.parameters()}
        self.assertNotIn(id(head.train_vocabulary), param_ids)

        # KD consumes the OV logits like linear ones: a linear teacher, the OV student
        model.zero_grad()
        torch.manual_seed(1)
        teacher_cfg = self.cfg(DAB_CONFIG, "MODEL.DETR.CLASS_HEAD", "linear")
        teacher = build_model(teacher_cfg).eval()
        images = model.preprocess_image(_batch())
        groups = [{"boxes": torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(2))}]
        with torch.no_grad():
            t_out = teacher.forward_raw(images, groups)
        s_out = model.forward_raw(images, groups)
        kd = kd_detr_losses(
            s_out["groups"][0], final_layer_targets(t_out["groups"][0]), None, "g", mode="sigmoid"
        )
        sum(kd.values()).backward()
        self.assertGreater(head.proj.weight.grad.abs().sum().item(), 0)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "focal loss.*MODEL.OV.BACKGROUND none"):
            build_model(self.cfg(DAB_CONFIG, "MODEL.OV.BACKGROUND", "zero"))
        with self.assertRaisesRegex(ValueError, "5 classes but MODEL.DETR.NUM_CLASSES is 6"):
            build_model(
                self.cfg(DAB_CONFIG, "MODEL.OV.BACKGROUND", "none", "MODEL.DETR.NUM_CLASSES", "6")
            )
        with self.assertRaisesRegex(ValueError, "dimension 16 .*EMBED_DIM"):
            build_model(
                self.cfg(DAB_CONFIG, "MODEL.OV.BACKGROUND", "none", "MODEL.OV.EMBED_DIM", "8")
            )
        with self.assertRaisesRegex(TypeError, "MODEL.DETR.CLASS_HEAD region_text"):
            set_detr_vocabulary(build_model(self.cfg(DAB_CONFIG, "MODEL.DETR.CLASS_HEAD",
                                                     "linear")), _emb(3, 0))  # fmt: skip


class TestDETRHead(_Base):
    def test_softmax_background_and_training(self):
        for background in ("zero", "learned"):
            model = self.model(DETR_CONFIG, "MODEL.OV.BACKGROUND", background).train()
            head = model.class_embed
            images = model.preprocess_image(_batch())
            out = model.forward_raw(images)
            logits, hs = out["layers"]["pred_logits"], out["layers"]["hidden_states"]
            self.assertEqual(tuple(logits.shape), (3, 2, 10, 6))  # C + 1, "no object" last
            cls = self.by_hand(head, hs.detach(), self.train_text, 0.02)
            torch.testing.assert_close(logits[..., :5].detach(), cls, rtol=1e-5, atol=1e-4)
            if background == "zero":
                self.assertTrue(bool((logits[..., 5] == 0).all()))
            losses = model(_batch())
            sum(losses.values()).backward()
            self.assertGreater(head.proj.weight.grad.abs().sum().item(), 0)
            if background == "learned":
                self.assertGreater(head.bg_embedding.grad.abs().sum().item(), 0)
            # eval: the 7-class test vocabulary, labels never the background
            model.eval()
            with torch.no_grad():
                results = model(_batch())
            for r in results:
                self.assertTrue(bool((r["instances"].pred_classes < 7).all()))

    def test_new_training_vocabulary_keeps_criterion_in_sync(self):
        model = self.model(DETR_CONFIG, "MODEL.OV.BACKGROUND", "zero").train()
        set_detr_vocabulary(model, _emb(9, 4), split="train")
        self.assertEqual(model.criterion.num_classes, 9)
        self.assertEqual(tuple(model.criterion.empty_weight.shape), (10,))
        self.assertAlmostEqual(model.criterion.empty_weight[-1].item(), 0.1)
        losses = model(_batch())
        self.assertTrue(torch.isfinite(sum(losses.values())))
        model.eval()  # the test vocabulary is untouched
        self.assertEqual(model.class_embed.num_classes, 7)
        with self.assertRaisesRegex(ValueError, "needs a 'no object' logit"):
            build_model(self.cfg(DETR_CONFIG, "MODEL.OV.BACKGROUND", "none"))


class TestDatasetVocabulary(unittest.TestCase):
    def test_select_by_name(self):
        emb = torch.arange(12.0).view(4, 3)
        row_names = ["cat", "Traffic_light", "dog", "car"]
        rows = select_vocabulary(emb, row_names, ["dog", "traffic light"])
        torch.testing.assert_close(rows, emb[[2, 1]])
        with self.assertRaisesRegex(ValueError, r"no row for the classes \['zebra'\]"):
            select_vocabulary(emb, ["cat", "dog"], ["cat", "zebra"])

    def test_detic_coco_rows_for_a_dataset(self):
        path = shared_data("clip_text", "coco_clip_a+cname.npy")
        name = "kd_test_ov_vocab_dog_person"
        MetadataCatalog.get(name).set(thing_classes=["dog", "person", "hair drier"])
        raw = torch.from_numpy(np.load(path).astype(np.float32))
        emb = dataset_vocabulary(path, name, expected_dim=512)
        # COCO contiguous indices: dog 16, person 0, hair drier 78
        torch.testing.assert_close(emb, F.normalize(raw[[16, 0, 78]], dim=1))
        with self.assertRaisesRegex(ValueError, "has no thing_classes"):
            dataset_vocabulary(path, "kd_test_ov_vocab_unregistered")


if __name__ == "__main__":
    unittest.main()
