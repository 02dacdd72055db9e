# Copyright (c) kd_detr contributors.
"""RT-DETR in training: losses against Hugging Face's ``RTDetrLoss`` and a float64 hand formula,
denoising targets, query selection, extra query groups (detection outputs unchanged), KD steps
with an RT-DETR student, and a few optimizer steps on real BCCD images."""
import os
import tempfile
import unittest

import torch

from detectron2.data import DatasetMapper
from detectron2.modeling import build_model

from kd_detr.data import load_voc_instances
from kd_detr.engine.optimizer import build_optimizer
from kd_detr.modeling.denoising import DenoisingGenerator
from kd_detr.modeling.meta_arch.rtdetr_criterion import denoising_targets, varifocal_loss

from .common import REPO_ROOT, shared_data
from .hf_reference import HFParityTestCase
from .kd_helpers import assert_kd_losses, kd_student_cfg, run_kd_step, save_teacher, synthetic_batch
from .model_helpers import config_from, perturb_box_heads, single_thread_module, train_demo_steps
from .test_rt_detr_parity import CONFIG, build_hf_rt_detr

setUpModule, tearDownModule = single_thread_module()

DINO_TINY = os.path.join(REPO_ROOT, "configs", "tests", "dino_tiny.yaml")
DEMO = os.path.join(REPO_ROOT, "configs", "demo", "rt_detr_efflite0_demo.yaml")
NO_DN = ["MODEL.DETR.DN.ENABLED", "False"]


def tiny_model(*opts, seed=0):
    """The tiny RT-DETR with perturbed box heads (so boxes move), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(config_from(CONFIG, *opts)).eval()
    perturb_box_heads(list(model.bbox_embed) + [model.enc_bbox_head])
    return model


def image_batch(bsz=2, h=96, w=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(bsz, 3, h, w, generator=gen), torch.zeros(bsz, h, w, dtype=torch.bool)


class TestLossesVsHuggingFace(HFParityTestCase):
    CONFIG = CONFIG

    def test_training_losses_equal_rt_detr_loss(self):
        """Train mode, no denoising: every weighted loss equals Hugging Face's (its "aux" L-1 is
        the selected encoder tokens, our "_enc")."""
        hf = build_hf_rt_detr(self.transformers, num_denoising=0)
        model = self.convert_and_load(self.save_hf(hf), NO_DN)[0]
        batch = synthetic_batch(2, size=96)
        model.train()
        hf.train()
        targets = model.prepare_targets(batch, [(96, 96)] * 2)
        ours = model(batch)
        pixels = torch.stack([x["image"] for x in batch]) / 255.0
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        theirs = hf(pixel_values=pixels, labels=labels).loss_dict
        names = {"loss_class": "loss_vfl", "loss_bbox": "loss_bbox", "loss_giou": "loss_giou"}
        pairs = {}
        for ours_key, hf_key in names.items():
            pairs[ours_key] = hf_key
            pairs[f"{ours_key}_0"] = f"{hf_key}_aux_0"
            pairs[f"{ours_key}_enc"] = f"{hf_key}_aux_1"
        self.assertEqual(set(ours), set(pairs))
        for key, hf_key in pairs.items():
            self.assertAlmostEqual(ours[key].item(), theirs[hf_key].item(), delta=1e-4, msg=key)
        self.assertGreater(ours["loss_class"].item(), 0)


class TestLossFormulas(unittest.TestCase):
    def test_varifocal_loss_hand_formula(self):
        logits = torch.tensor([[1.5, -0.5], [-2.0, 0.25]], dtype=torch.float64)
        onehot = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
        score = onehot * 0.7
        loss = varifocal_loss(logits, score, onehot, alpha=0.75, gamma=2.0)
        expected = torch.zeros(2, 2, dtype=torch.float64)
        for i in range(2):
            for j in range(2):
                p, q = torch.sigmoid(logits[i, j]).item(), score[i, j].item()
                w = 0.75 * p**2 * (1 - onehot[i, j].item()) + q
                bce = -(q * torch.log(torch.tensor(p)) + (1 - q) * torch.log(torch.tensor(1 - p)))
                expected[i, j] = w * bce
        torch.testing.assert_close(loss, expected)

    def test_denoising_targets_pair_positives_with_their_objects(self):
        gen = DenoisingGenerator(5, 8, num_queries=6, contrastive=True, with_indicator=False)
        targets = [
            {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2)},
            {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.6, 0.5, 0.3, 0.1]])},
        ]
        queries = gen(targets, torch.Generator().manual_seed(0))
        self.assertEqual(queries.num_groups, 3)  # budget 6 // 2 objects; groups of 2 + 2 slots
        dn_targets, indices = denoising_targets(queries)
        for image, (t, (slots, tgt)) in enumerate(zip(dn_targets, indices)):
            self.assertEqual(len(slots), queries.num_groups * len(targets[image]["labels"]))
            # positives sit in the first half of every group; object j at group start + j
            self.assertTrue(((slots % queries.group_size) < queries.group_size // 2).all())
            expected = targets[image]["labels"][slots % queries.group_size]
            torch.testing.assert_close(t["labels"], expected)
            torch.testing.assert_close(tgt, torch.arange(len(slots)))


class TestQueriesAndGroups(unittest.TestCase):
    def test_query_selection_takes_the_top_tokens(self):
        model = tiny_model()
        images = image_batch()
        with torch.no_grad():
            encoded = model.encode(images)
            out = model.forward_raw(images)
            feats = model.enc_output(encoded["memory"])  # every token is valid at these sizes
            scores = model.enc_score_head(feats).max(-1).values
        top = scores.topk(model.num_queries, dim=1).indices
        expected = feats.gather(1, top[..., None].expand(-1, -1, feats.shape[-1]))
        torch.testing.assert_close(out["layers"]["query_content"], expected)
        torch.testing.assert_close(
            out["layers"]["reference_boxes"][0], out["enc_outputs"]["pred_boxes"]
        )

    def test_detection_outputs_do_not_depend_on_groups_or_denoising(self):
        images = image_batch()
        groups = [
            {"boxes": torch.rand(1, 7, 4) * 0.5 + 0.25},
            {"boxes": torch.rand(2, 3, 4) * 0.5 + 0.25, "content": torch.randn(2, 3, 64)},
        ]
        targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4) * 0.4 + 0.3}] * 2
        for decoding in ("masked", "separate"):
            model = tiny_model("MODEL.DETR.GROUP_DECODING", decoding)
            dn = model.denoising(targets, torch.Generator().manual_seed(0))
            with torch.no_grad():
                plain = model.forward_raw(images)
                with_groups = model.forward_raw(images, groups, dn)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(with_groups["layers"][key], plain["layers"][key])
            self.assertEqual(tuple(with_groups["groups"][1]["pred_boxes"].shape), (2, 2, 3, 4))
            self.assertIn("denoising", with_groups)
        # a group decoded alone equals the same group decoded with others
        with torch.no_grad():
            alone = model.forward_raw(images, groups[1:])["groups"][0]
        torch.testing.assert_close(alone["pred_boxes"], with_groups["groups"][1]["pred_boxes"])

    def test_padded_images_predict_in_their_own_frame(self):
        """The models read the padded canvas as is; a padded image's boxes (outputs, groups,
        denoising) are relative to the image, i.e. the canvas-frame boxes divided by
        (w / W, h / H)."""
        dfine_config = os.path.join(REPO_ROOT, "configs", "tests", "dfine_tiny_parity.yaml")
        canvas = torch.zeros(1, 3, 96, 128)
        canvas[..., :64, :96] = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
        mask = torch.ones(1, 96, 128, dtype=torch.bool)
        mask[:, :64, :96] = False
        scale = torch.tensor([96 / 128, 64 / 96, 96 / 128, 64 / 96])
        boxes = torch.tensor([[[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]])
        for config in (CONFIG, dfine_config):
            torch.manual_seed(0)
            model = build_model(config_from(config)).eval()
            perturb_box_heads([model.enc_bbox_head])
            with torch.no_grad():
                padded = model.forward_raw((canvas, mask), [{"boxes": boxes}])
                unmasked = (canvas, torch.zeros_like(mask))
                plain = model.forward_raw(unmasked, [{"boxes": boxes * scale}])
            for name in ("layers", "enc_outputs"):
                ours, canvas_frame = padded[name]["pred_boxes"], plain[name]["pred_boxes"]
                torch.testing.assert_close(ours * scale, canvas_frame)
            logits = padded["layers"]["pred_logits"]
            torch.testing.assert_close(logits, plain["layers"]["pred_logits"])
            group, plain_group = padded["groups"][0], plain["groups"][0]
            torch.testing.assert_close(group["reference_boxes"][0], boxes)  # given = reported
            torch.testing.assert_close(group["pred_boxes"] * scale, plain_group["pred_boxes"])

    def test_bad_group_is_refused(self):
        model = tiny_model()
        with self.assertRaisesRegex(ValueError, "'boxes' must be"):
            model.forward_raw(image_batch(), [{"boxes": torch.rand(3, 5)}])


class TestKDWithRTDETRStudent(unittest.TestCase):
    def test_kd_step_dino_teacher_into_rt_detr_student(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp, config_file=DINO_TINY)
            cfg = kd_student_cfg(CONFIG, tmp, weights)
            trainer, losses, t_calls, s_calls = run_kd_step(cfg, DINO_TINY, [])
        assert_kd_losses(self, losses)
        self.assertIn("loss_class_dn", losses)  # the student trains with denoising
        specific = s_calls[0]["kwargs"]["extra_query_groups"][0]
        t_out = t_calls[0]["out"]
        torch.testing.assert_close(specific["boxes"], t_out["layers"]["reference_boxes"][0])

    def test_kd_step_rt_detr_teacher_into_rt_detr_student(self):
        def heads(model):
            return list(model.bbox_embed) + [model.enc_bbox_head]

        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp, config_file=CONFIG, box_heads=heads)
            cfg = kd_student_cfg(CONFIG, tmp, weights, ["MODEL.DETR.DEC_LAYERS", "3"])
            trainer, losses, t_calls, s_calls = run_kd_step(cfg, CONFIG, [])
        assert_kd_losses(self, losses)
        t_out = t_calls[0]["out"]
        specific = s_calls[0]["kwargs"]["extra_query_groups"][0]
        # The student decodes the teacher's queries: selected boxes and selected features.
        torch.testing.assert_close(specific["content"], t_out["layers"]["query_content"])
        self.assertEqual(trainer.model.transformer.num_decoder_layers, 3)


class TestDemoConfigTrains(unittest.TestCase):
    def test_a_few_iterations_on_demo_data(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainable, reached, losses = train_demo_steps(self, DEMO, os.path.join(tmp, "data"))
        # Every trainable parameter gets a gradient (denoising and encoder heads included).
        self.assertEqual(set(trainable) - reached, set())
        for key in ("loss_giou_1", "loss_class_enc", "loss_class_dn", "loss_bbox_dn_0"):
            self.assertGreater(losses[key].item(), 0, key)


BCCD_CLASSES = ["RBC", "WBC", "Platelets"]


class TestBCCDTraining(unittest.TestCase):
    def test_loss_decreases_on_real_images(self):
        root = shared_data("bccd")
        dicts = load_voc_instances(root, "train", BCCD_CLASSES)[:2]
        cfg = config_from(
            CONFIG,
            "MODEL.DETR.NUM_CLASSES", "3", "MODEL.DETR.NUM_QUERIES", "40",
            "MODEL.DETR.DN.NUM_QUERIES", "40",
            "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "214",
            "INPUT.RANDOM_FLIP", "none", "SOLVER.BASE_LR", "2e-3", "SOLVER.WEIGHT_DECAY", "0.0",
        )  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg).train()
        batch = [DatasetMapper(cfg, is_train=True)(dict(d)) for d in dicts]
        optimizer = build_optimizer(cfg, model)
        losses = []
        for _ in range(16):
            torch.manual_seed(len(losses))  # the same denoising noise in every run
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        self.assertLess(sum(losses[-3:]) / 3, 0.8 * sum(losses[:3]) / 3, losses)


if __name__ == "__main__":
    unittest.main()
