# Copyright (c) kd_detr contributors.
"""KD terms that all-reduce their normalisers (DETRDistill's matched pairs, feature tokens and
object counts; QSKD's pairs and tokens; D3ETR's adaptive and fixed pairs): two CPU processes
(gloo), each holding half of a batch, equal one process holding all of it. The ranks' mean loss
is the single process's loss, and half a rank's input gradient (DDP averages over 2 ranks) is
the single process's gradient of those inputs; the adapters' averaged gradients are the single
process's."""
import os
import tempfile
import unittest

import pytest
import torch

from kd_detr.distill import D3ETRLoss, DETRDistillLoss, PointPair, QSKDLoss
from kd_detr.engine import launch

from .kd_query_helpers import StandInDETR, make_targets, query_context, random_boxes

B, LS, LT, Q, N, C, DS, DT, S = 4, 2, 2, 5, 4, 3, 3, 4, 6


def batch():
    """One batch of 4 images: detections, a specific group, memories and the ground truth."""
    gen = torch.Generator().manual_seed(0)
    student = {"pred_logits": 2 * torch.randn(LS, B, Q, C, generator=gen),
               "pred_boxes": random_boxes(gen, LS, B, Q)}  # fmt: skip
    teacher = {"pred_logits": 2 * torch.randn(LT, B, N, C, generator=gen),
               "pred_boxes": random_boxes(gen, LT, B, N),
               "hidden_states": torch.randn(LT, B, N, DT, generator=gen)}  # fmt: skip
    group = {"pred_logits": torch.randn(LS, B, N, C, generator=gen),
             "pred_boxes": random_boxes(gen, LS, B, N)}  # fmt: skip
    memory = {"s": torch.randn(B, S, DS, generator=gen), "t": torch.randn(B, S, DT, generator=gen)}
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 4:] = padding[2, 5:] = True
    targets = make_targets(gen, (2, 0, 1, 3), C)
    return student, teacher, group, memory, padding, targets


def _losses(images, out_file):
    """The losses and gradients of both terms on the images ``images`` of :func:`batch`."""
    student, teacher, group, memory, padding, targets = batch()
    pick = lambda d: {k: v[:, images].clone().requires_grad_() for k, v in d.items()}  # noqa
    student, group = pick(student), pick(group)
    teacher = {k: v[:, images] for k, v in teacher.items()}
    s_mem = memory["s"][images].clone().requires_grad_()
    targets = [targets[i] for i in images]
    result = {}
    for cls in (DETRDistillLoss, QSKDLoss, D3ETRLoss):
        torch.manual_seed(0)  # the same adapter on every rank
        term = cls(softmax=False)
        term.bind(StandInDETR(DS, num_classes=C), StandInDETR(DT, num_classes=C))
        pairs = [PointPair("specific", group, {}, None)]
        context = query_context(student, teacher, targets, s_mem, memory["t"][images],
                                padding[images], pairs=pairs)  # fmt: skip
        losses = term(context)
        total = sum(losses.values())
        grads = torch.autograd.grad(total, [*student.values(), *group.values(), s_mem,
                                            *term.parameters()], allow_unused=True)  # fmt: skip
        result[cls.__name__] = {
            "losses": {k: v.item() for k, v in losses.items()},
            "grads": [torch.zeros(0) if g is None else g for g in grads],
        }
    torch.save(result, out_file)


def _worker(out_pattern):
    from detectron2.utils import comm

    torch.set_num_threads(1)
    rank = comm.get_rank()
    _losses([2 * rank, 2 * rank + 1], out_pattern.format(rank=rank))


@pytest.mark.slow
class TestTwoProcessesEqualOne(unittest.TestCase):
    def test_detr_distill_qskd_and_d3etr(self):
        with tempfile.TemporaryDirectory() as tmp:
            pattern = os.path.join(tmp, "two_{rank}.pt")
            launch(_worker, 2, dist_url="auto", args=(pattern,))
            ranks = [torch.load(pattern.format(rank=r), weights_only=False) for r in (0, 1)]
            _losses([0, 1, 2, 3], os.path.join(tmp, "one.pt"))
            one = torch.load(os.path.join(tmp, "one.pt"), weights_only=False)
        for name, ref in one.items():
            self.assertGreaterEqual(len(ref["losses"]), 8, name)
            for key, value in ref["losses"].items():
                mean = (ranks[0][name]["losses"][key] + ranks[1][name]["losses"][key]) / 2
                self.assertAlmostEqual(mean, value, delta=1e-5 * max(1.0, abs(value)),
                                       msg=f"{name} {key}")  # fmt: skip
            num_inputs = 5  # student logits, boxes, group logits, boxes, student memory
            for i, grad in enumerate(ref["grads"]):
                # an input the term does not read (QSKD: the group, D3ETR: the memory)
                if grad.numel() == 0:
                    self.assertTrue(all(ranks[r][name]["grads"][i].numel() == 0 for r in (0, 1)))
                    continue
                if i < num_inputs:
                    halves = [ranks[r][name]["grads"][i] / 2 for r in (0, 1)]
                    expected = torch.cat(halves, dim=0 if i == num_inputs - 1 else 1)
                else:  # adapter parameters: DDP-style mean over the ranks
                    expected = (ranks[0][name]["grads"][i] + ranks[1][name]["grads"][i]) / 2
                torch.testing.assert_close(expected, grad, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} gradient {i}")  # fmt: skip


if __name__ == "__main__":
    unittest.main()
