# Copyright (c) kd_detr contributors.
"""Shared pieces of the DETR-specific KD term tests (DETRDistill, QSKD): independent float64
references (numpy; scipy's linear_sum_assignment for the matchings), hand-made contexts and
stand-in models for ``bind``."""
import copy
import os
import tempfile

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from kd_detr.distill import KDContext
from kd_detr.modeling.criterion import SetCriterion
from kd_detr.modeling.matcher import HungarianMatcher

from .common import REPO_ROOT
from .kd_feature_helpers import term_parameter_checks
from .kd_helpers import TINY_OPTS, FixedBatchKDTrainer, kd_cfg, kd_student_cfg, save_teacher


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_xyxy(b):
    return np.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                     b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1)  # fmt: skip


def np_iou_giou(a, b):
    """IoU and GIoU of two single cxcywh boxes (plain float arithmetic)."""
    a, b = np_xyxy(np.asarray(a, float)), np_xyxy(np.asarray(b, float))
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (enclosing - union) / enclosing


def np_soft_ce(zs, zt, softmax):
    """Soft cross-entropy of one student logit vector against a teacher's, summed over classes."""
    zs, zt = np.asarray(zs, float), np.asarray(zt, float)
    if softmax:
        p = np.exp(np_log_softmax(zt))
        return float(-(p * np_log_softmax(zs)).sum())
    q, s = np_sigmoid(zt), np_sigmoid(zs)
    return float(-(q * np.log(s) + (1 - q) * np.log(1 - s)).sum())


def np_soft_match(s_logits, s_boxes, t_logits, t_boxes, softmax, costs=(1.0, 5.0, 2.0)):
    """scipy Hungarian matching of student predictions to teacher predictions (float64)."""
    cost = np.zeros((len(s_logits), len(t_logits)))
    for i in range(len(s_logits)):
        for j in range(len(t_logits)):
            giou = np_iou_giou(s_boxes[i], t_boxes[j])[1]
            cost[i, j] = (costs[0] * np_soft_ce(s_logits[i], t_logits[j], softmax)
                          + costs[1] * np.abs(s_boxes[i] - t_boxes[j]).sum() - costs[2] * giou)
    return linear_sum_assignment(cost)


def np_gt_match(logits, boxes, labels, gt, softmax, costs=(2.0, 5.0, 2.0)):
    """scipy Hungarian matching of predictions to the ground truth with the project's costs
    (focal class cost for sigmoid models, minus the probability for softmax ones)."""
    cost = np.zeros((len(logits), len(labels)))
    for i in range(len(logits)):
        for j, c in enumerate(labels):
            if softmax:
                cls = -np.exp(np_log_softmax(logits[i]))[c]
            else:
                p = np_sigmoid(logits[i][c])
                cls = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p**2 * -np.log(1 - p + 1e-8)
            giou = np_iou_giou(boxes[i], gt[j])[1]
            l1 = np.abs(boxes[i] - gt[j]).sum()
            cost[i, j] = costs[0] * cls + costs[1] * l1 - costs[2] * giou
    return linear_sum_assignment(cost)


def np_pair_sums(s_logits, s_boxes, t_logits, t_boxes, pairs, softmax):
    """(cls, l1, giou, n) summed over (student index, teacher index) pairs."""
    cls = l1 = giou = 0.0
    for i, j in pairs:
        cls += np_soft_ce(s_logits[i], t_logits[j], softmax)
        l1 += np.abs(s_boxes[i] - t_boxes[j]).sum()
        giou += 1 - np_iou_giou(s_boxes[i], t_boxes[j])[1]
    return cls, l1, giou, len(pairs)


def random_boxes(gen, *shape):
    """cxcywh boxes well inside the image."""
    centre = 0.25 + 0.5 * torch.rand(*shape, 2, generator=gen)
    size = 0.1 + 0.3 * torch.rand(*shape, 2, generator=gen)
    return torch.cat([centre, size], -1)


def make_targets(gen, counts, num_classes):
    return [{"labels": torch.randint(num_classes, (n,), generator=gen),
             "boxes": random_boxes(gen, n)} for n in counts]  # fmt: skip


def np_(t):
    """A tensor as a float64 numpy array (detached)."""
    return t.detach().double().numpy()


def make_query_kd_inputs(seed, *, shapes, num_logits, padded_from, target_counts, num_classes,
                         box_sampler=random_boxes):  # fmt: skip
    """Random inputs of a query-based KD term (DETRDistill, QSKD).

    Args:
        shapes (tuple): (B, L_s, L_t, Q, N, D_s, D_t, S): images, student / teacher decoder
            layers, student / teacher queries, student / teacher widths, memory tokens.
        padded_from (int): memory tokens of image 1 from this index on are padding.

    Returns:
        student {"pred_logits" (L_s, B, Q, K), "pred_boxes" (L_s, B, Q, 4)}, teacher (the same
        at (L_t, B, N) plus "hidden_states" (L_t, B, N, D_t)), student memory (B, S, D_s),
        teacher memory (B, S, D_t), padding (B, S) bool, targets (one dict per image).
    """
    b, ls, lt, q, n, ds, dt, s = shapes
    gen = torch.Generator().manual_seed(seed)
    k = num_logits
    student = {"pred_logits": (2 * torch.randn(ls, b, q, k, generator=gen)).requires_grad_(),
               "pred_boxes": box_sampler(gen, ls, b, q).requires_grad_()}  # fmt: skip
    teacher = {"pred_logits": (2 * torch.randn(lt, b, n, k, generator=gen)).requires_grad_(),
               "pred_boxes": box_sampler(gen, lt, b, n).requires_grad_(),
               "hidden_states": torch.randn(lt, b, n, dt, generator=gen)}  # fmt: skip
    s_mem = torch.randn(b, s, ds, generator=gen, requires_grad=True)
    t_mem = torch.randn(b, s, dt, generator=gen, requires_grad=True)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[1, padded_from:] = True
    targets = make_targets(gen, target_counts, num_classes)
    return student, teacher, s_mem, t_mem, padding, targets


def query_context(student_layers, teacher_layers, targets, s_memory=None, t_memory=None,
                  padding=None, pairs=()):  # fmt: skip
    """A KDContext with the student's detection layers, the teacher's detections (every layer)
    and, optionally, both encoder memories (B, S, d) on a (1, S) grid with a (B, S) padding
    mask."""

    def encoder(memory):
        if memory is None:
            return {}
        mask = torch.zeros(memory.shape[:2], dtype=torch.bool) if padding is None else padding
        return {"memory": memory, "mask": mask, "spatial_shape": (1, memory.shape[1])}

    context = KDContext(
        0, [], [], {"layers": student_layers, "encoder": encoder(s_memory)},
        {"layers": teacher_layers, "encoder": encoder(t_memory)}, False, targets=targets,
        pairs=list(pairs),
    )  # fmt: skip
    context.teacher_detections = {k: v.detach() for k, v in teacher_layers.items()}
    return context


class StandInDETR(nn.Module):
    """The members of a DETR-family model the terms' ``bind`` reads."""

    def __init__(self, hidden_dim=4, use_focal=True, box_query_groups=True, num_classes=3,
                 decoder_attention_maps=True):  # fmt: skip
        super().__init__()
        self.hidden_dim, self.use_focal = hidden_dim, use_focal
        self.decoder_attention_maps = decoder_attention_maps  # DETR, DAB-DETR (D3ETR's maps)
        self.box_query_groups, self.keep_backbone_features = box_query_groups, False
        matcher = HungarianMatcher(2.0, 5.0, 2.0, use_focal=use_focal)
        weights = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        self.criterion = SetCriterion(num_classes, matcher, weights, eos_coef=0.1,
                                      use_focal=use_focal)  # fmt: skip

    def preprocess_image(self, batched_inputs):
        raise NotImplementedError

    def prepare_targets(self, batched_inputs, image_sizes):
        raise NotImplementedError

    def forward_raw(self, images, extra_query_groups=None):
        raise NotImplementedError

    def detection_query_content(self, batch_size, outputs):
        return None


class NotADETR(nn.Module):
    """A model without the DistillableDETR members (e.g. a foreign detector)."""


DETR_TINY = os.path.join(REPO_ROOT, "configs", "tests", "detr_tiny_parity.yaml")


def detr_trainer(tmp, *opts):
    """A FixedBatchKDTrainer of a tiny vanilla (softmax) DETR distilled from another."""
    heads = lambda m: [m.bbox_embed]  # noqa: E731
    weights = save_teacher(tmp, config_file=DETR_TINY, box_heads=heads)
    cfg = kd_student_cfg(DETR_TINY, os.path.join(tmp, "run"), weights)
    cfg.defrost()
    cfg.MODEL.KD.TEACHER.CONFIG_FILE = DETR_TINY
    cfg.MODEL.KD.TEACHER.OPTS = TINY_OPTS
    cfg.merge_from_list(["SOLVER.MAX_ITER", "1", "MODEL.KD.LOSSES", "['DETRDistillLoss']", *opts])
    cfg.freeze()
    return FixedBatchKDTrainer(cfg)


def check_adapter_resume(test, *opts):
    """A tiny DAB-DETR student (d 64) distilled from a narrower teacher (d 32) by the term of
    ``opts`` (the first KD term): its memory adapter (64 -> 32) is a term parameter in the
    optimizer, not in the teacher, learned, checkpointed, and a run resumed from iteration 1's
    checkpoint ends with the same adapter and student as the uninterrupted run."""
    with tempfile.TemporaryDirectory() as tmp:
        narrow = ["MODEL.DETR.HIDDEN_DIM", "32"]
        weights = save_teacher(tmp, *narrow)
        cfg = kd_cfg(os.path.join(tmp, "run"), weights, "SOLVER.MAX_ITER", "3",
                     "SOLVER.CHECKPOINT_PERIOD", "2", *opts)  # fmt: skip
        cfg.defrost()
        cfg.MODEL.KD.TEACHER.OPTS = TINY_OPTS + narrow
        cfg.freeze()
        trainer = FixedBatchKDTrainer(cfg)
        term = trainer.kd_losses[0]
        test.assertEqual(tuple(term.adapter.weight.shape), (32, 64))
        term_parameter_checks(test, trainer, term)
        before = term.adapter.weight.detach().clone()
        trainer.resume_or_load(resume=False)
        trainer.train()
        test.assertFalse(torch.equal(term.adapter.weight, before))  # learned
        final = copy.deepcopy(term.state_dict())
        student = copy.deepcopy(trainer.model.state_dict())
        saved = torch.load(os.path.join(tmp, "run", "model_0000001.pth"), weights_only=False)
        test.assertIn("0.adapter.weight", saved["kd_losses"])
        # Resume from iteration 1's checkpoint and train iteration 2 again: the same state.
        with open(os.path.join(tmp, "run", "last_checkpoint"), "w") as f:
            f.write("model_0000001.pth")
        resumed = FixedBatchKDTrainer(cfg)
        resumed.resume_or_load(resume=True)
        test.assertTrue(torch.equal(resumed.kd_losses[0].adapter.weight,
                                    saved["kd_losses"]["0.adapter.weight"]))  # fmt: skip
        test.assertFalse(torch.equal(resumed.kd_losses[0].adapter.weight, final["adapter.weight"]))
        resumed.train()
        for key, value in resumed.kd_losses[0].state_dict().items():
            test.assertTrue(torch.equal(value, final[key]), key)
        for key, value in resumed.model.state_dict().items():
            test.assertTrue(torch.equal(value, student[key]), key)


def assert_same_outputs(test, losses, plain, kept_losses, kept):
    """A forward pass that kept its attention maps gave the losses and every layer's and
    group's outputs of the plain pass, bit for bit, and the plain pass returned no maps."""
    test.assertNotIn("attention_maps", plain)
    test.assertEqual(set(losses), set(kept_losses))
    for key in losses:
        test.assertTrue(torch.equal(losses[key], kept_losses[key]), key)
    for a, b in zip([plain["layers"], *plain["groups"]], [kept["layers"], *kept["groups"]]):
        for key in a:
            test.assertTrue(torch.equal(a[key], b[key]), key)
