# Copyright (c) kd_detr contributors.
"""D3ETR's attention-map distillation: the decoders' attention maps (DETR, DAB-DETR) against an
independent float64 recomputation from a layer's weights, rows that sum to 1 and zeros where
attention is blocked; each query set's own block under group decoding (masked, separate,
checkpointed, with denoising queries); outputs bit-identical with and without the maps; the
self- and cross-attention losses of both matchings against float64 numpy on hand-made maps
(equal and different head counts); gradients to the student only; KD steps with the attention
terms. Deformable DETR / DINO maps and the start-up error on models without maps (RT-DETR,
D-FINE): tests/test_kd_d3etr_deformable.py."""
import math
import os
import tempfile
import unittest

import numpy as np
import torch

from detectron2.modeling import build_model

from kd_detr.distill import D3ETRLoss, KDContext, PointPair, keeping_attention_maps
from kd_detr.modeling.transformer.dab_transformer import DABDecoderLayer
from kd_detr.modeling.transformer.detr_transformer import TransformerDecoderLayer

from .common import REPO_ROOT
from .kd_feature_helpers import demo_pair_trainer, logged_losses
from .kd_helpers import (
    TINY_OPTS,
    config_from,
    kd_student_cfg,
    run_kd_step,
    save_teacher,
    synthetic_batch,
)
from .kd_query_helpers import StandInDETR, assert_same_outputs, np_, np_soft_match, random_boxes
from .model_helpers import single_thread_module

setUpModule, tearDownModule = single_thread_module()

TESTS = os.path.join(REPO_ROOT, "configs", "tests")
DAB_TINY = os.path.join(TESTS, "dab_detr_tiny_parity.yaml")
DETR_TINY = os.path.join(TESTS, "detr_tiny_parity.yaml")


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_heads(x, heads):
    """(B, L, d) -> (B, h, L, d / h)."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def np_attention(q, k, heads, blocked=None):
    """float64 softmax(Q K^T / sqrt(d_head)) per head, -inf where ``blocked`` (B or 1, Lq, S)."""
    q, k = np_heads(q, heads), np_heads(k, heads)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if blocked is not None:
        logits = np.where(blocked[:, None], -np.inf, logits)
    return np_softmax(logits)


def linear(x, layer):
    return x @ np_(layer.weight).T + np_(layer.bias)


def layer_norm(x, norm):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.eps) * np_(norm.weight) + np_(norm.bias)


def decoder_inputs(seed, b=2, n=5, s=7, d=8):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, m, d, generator=gen) for m in (n, s, s, n)]
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[1, s - 3:] = True
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[:2, 2:] = blocked[2:, :2] = True  # two groups: queries 0-1 and 2-4
    return (*tensors, padding, blocked)


class TestDecoderMaps(unittest.TestCase):
    def check_rows(self, self_attn, cross_attn, padding, blocked):
        torch.testing.assert_close(self_attn.sum(-1), torch.ones(self_attn.shape[:-1]))
        torch.testing.assert_close(cross_attn.sum(-1), torch.ones(cross_attn.shape[:-1]))
        self.assertTrue((self_attn[..., blocked] == 0).all())
        self.assertTrue((cross_attn.permute(0, 3, 1, 2)[padding] == 0).all())

    def test_detr_layer_against_float64(self):
        tgt, memory, pos, query_pos, padding, blocked = decoder_inputs(0)
        layer = TransformerDecoderLayer(8, 2, 16, dropout=0.0).eval()
        kwargs = dict(pos=pos, query_pos=query_pos, memory_key_padding_mask=padding,
                      self_attn_mask=blocked)  # fmt: skip
        with torch.no_grad():
            plain = layer(tgt, memory, **kwargs)
            out, self_attn, cross_attn = layer(tgt, memory, need_weights=True, **kwargs)
        self.assertTrue(torch.equal(plain, out))  # the fused output, bit for bit
        self.check_rows(self_attn, cross_attn, padding, blocked)
        # float64 from the layer's weights: post-norm self-attention, then the cross-attention
        x, qp, mem, mpos = (np_(t) for t in (tgt, query_pos, memory, pos))
        sa, ca = layer.self_attn, layer.cross_attn
        a = np_attention(linear(x + qp, sa.q_proj), linear(x + qp, sa.k_proj), 2,
                         np_(blocked)[None].astype(bool))  # fmt: skip
        np.testing.assert_allclose(np_(self_attn), a, atol=1e-6)
        v = np_heads(linear(x, sa.v_proj), 2)
        mixed = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x1 = layer_norm(x + linear(mixed, sa.out_proj), layer.norm1)
        blocked_tokens = np.broadcast_to(np_(padding)[:, None].astype(bool), (2, 5, 7))
        c = np_attention(linear(x1 + qp, ca.q_proj), linear(mem + mpos, ca.k_proj), 2,
                         blocked_tokens)  # fmt: skip
        np.testing.assert_allclose(np_(cross_attn), c, atol=1e-6)

    def test_dab_layer_against_float64(self):
        tgt, memory, pos, query_pos, padding, blocked = decoder_inputs(1)
        sine = torch.randn(tgt.shape, generator=torch.Generator().manual_seed(9))
        layer = DABDecoderLayer(8, 2, 16, dropout=0.0, is_first=True).eval()
        args = (tgt, memory, pos, query_pos, sine, padding, blocked)
        with torch.no_grad():
            plain = layer(*args)
            out, self_attn, cross_attn = layer(*args, need_weights=True)
        self.assertTrue(torch.equal(plain, out))
        self.check_rows(self_attn, cross_attn, padding, blocked)
        x, qp = np_(tgt), np_(query_pos)
        q = linear(x, layer.sa_qcontent_proj) + linear(qp, layer.sa_qpos_proj)
        k = linear(x, layer.sa_kcontent_proj) + linear(qp, layer.sa_kpos_proj)
        a = np_attention(q, k, 2, np_(blocked)[None].astype(bool))
        np.testing.assert_allclose(np_(self_attn), a, atol=1e-6)
        # conditional cross-attention: per head [content (+ positional) | sine], width 2d / h
        v = np_heads(linear(x, layer.sa_v_proj), 2)
        mixed = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x1 = layer_norm(x + linear(mixed, layer.self_attn_out_proj), layer.norm1)
        mem, mpos = np_(memory), np_(pos)

        def interleave(u, w):  # (B, L, d) x 2 -> (B, L, 2d), per head [u_h | w_h]
            b, n, d = u.shape
            return np.concatenate([u.reshape(b, n, 2, d // 2), w.reshape(b, n, 2, d // 2)],
                                  -1).reshape(b, n, 2 * d)  # fmt: skip

        k_pos = linear(mpos, layer.ca_kpos_proj)
        q = interleave(linear(x1, layer.ca_qcontent_proj) + linear(qp, layer.ca_qpos_proj),
                       linear(np_(sine), layer.ca_qpos_sine_proj))  # fmt: skip
        k = interleave(linear(mem, layer.ca_kcontent_proj) + k_pos, k_pos)
        blocked_tokens = np.broadcast_to(np_(padding)[:, None].astype(bool), (2, 5, 7))
        np.testing.assert_allclose(np_(cross_attn), np_attention(q, k, 2, blocked_tokens),
                                   atol=1e-6)  # fmt: skip


def tiny_model(config_file, *opts, seed=0):
    torch.manual_seed(seed)
    return build_model(config_from(config_file, *TINY_OPTS, *opts))


def box_groups(dab, sizes=(3, 4)):
    gen = torch.Generator().manual_seed(5)
    if dab:
        return [{"boxes": random_boxes(gen, 1, m)} for m in sizes]
    return [{"pos": torch.randn(1, m, 64, generator=gen)} for m in sizes]


def run(model, data, groups, keep):
    """Training forward with or without the maps (same dropout draws)."""
    torch.manual_seed(3)
    model.keep_attention_maps = keep
    try:
        return model(data, extra_query_groups=groups)
    finally:
        model.keep_attention_maps = False


class TestModelMaps(unittest.TestCase):
    CASES = [
        (DAB_TINY, ()), (DAB_TINY, ("MODEL.DETR.GROUP_DECODING", "masked")),
        (DAB_TINY, ("MODEL.DETR.DN.ENABLED", "True")),
        (DAB_TINY, ("MODEL.DETR.DN.ENABLED", "True", "MODEL.DETR.GROUP_DECODING", "masked")),
        (DAB_TINY, ("MODEL.DETR.GROUP_CHECKPOINT", "True")),
        (DETR_TINY, ()), (DETR_TINY, ("MODEL.DETR.GROUP_DECODING", "masked")),
    ]  # fmt: skip

    def test_outputs_unchanged_and_maps_shaped(self):
        data = synthetic_batch(2)
        for config_file, opts in self.CASES:
            with self.subTest(config=os.path.basename(config_file), opts=opts):
                model = tiny_model(config_file, *opts).train()
                dab = config_file == DAB_TINY
                groups = box_groups(dab)
                losses, plain = run(model, data, groups, False)
                kept_losses, kept = run(model, data, groups, True)
                assert_same_outputs(self, losses, plain, kept_losses, kept)
                maps = kept["attention_maps"]
                layers = model.transformer.num_decoder_layers
                tokens = kept["encoder"]["memory"].shape[1]
                for part, n in zip([maps["layers"], *maps["groups"]], (6, 3, 4)):
                    self.assertEqual(tuple(part["self_attn"].shape), (layers, 2, 4, n, n))
                    self.assertEqual(tuple(part["cross_attn"].shape), (layers, 2, 4, n, tokens))
                    torch.testing.assert_close(part["self_attn"].sum(-1),
                                               torch.ones(layers, 2, 4, n))  # fmt: skip
                    padding = kept["encoder"]["mask"][None, :, None, None].expand_as(
                        part["cross_attn"]
                    )
                    self.assertTrue((part["cross_attn"][padding] == 0).all())
                # a plain pass afterwards: the flag is off again, nothing kept
                again, plain_again = run(model, data, groups, False)
                self.assertNotIn("attention_maps", plain_again)

    def test_group_block_is_the_groups_own(self):
        """A group's maps from a masked pass (its block of the joint self-attention) equal its
        maps decoded on its own; the same with denoising queries in the pass and under
        activation checkpointing (maps and their gradients)."""
        data = synthetic_batch(2)
        groups = box_groups(True)
        no_dropout = ("MODEL.DETR.DROPOUT", "0.0")
        for dn in ("False", "True"):
            reference = tiny_model(DAB_TINY, "MODEL.DETR.DN.ENABLED", dn, *no_dropout).eval()
            with torch.no_grad():  # eval: no denoising queries, every set in its own pass
                _, alone = run(reference, data, groups, True)
            model = tiny_model(DAB_TINY, "MODEL.DETR.DN.ENABLED", dn, *no_dropout,
                               "MODEL.DETR.GROUP_DECODING", "masked")  # fmt: skip
            model.load_state_dict(reference.state_dict())
            with torch.no_grad():  # training: the denoising queries join the masked pass
                _, joint = run(model.train(), data, groups, True)
            self.assertEqual("denoising" in joint, dn == "True")
            for a, b in zip([alone["attention_maps"]["layers"], *alone["attention_maps"]["groups"]],
                            [joint["attention_maps"]["layers"],
                             *joint["attention_maps"]["groups"]]):  # fmt: skip
                for key in ("self_attn", "cross_attn"):
                    torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
        # checkpointed groups: the same maps and gradients as a plain pass
        grads = []
        reference = tiny_model(DAB_TINY)
        for flag in ("False", "True"):
            model = tiny_model(DAB_TINY, "MODEL.DETR.GROUP_CHECKPOINT", flag).train()
            model.load_state_dict(reference.state_dict())
            _, out = run(model, data, groups, True)
            g = out["attention_maps"]["groups"]
            loss = sum(m["self_attn"].pow(2).sum() + m["cross_attn"].pow(2).sum() for m in g)
            loss.backward()  # the recomputation runs with the flag already off
            grads.append(model.transformer.decoder.layers[1].sa_qcontent_proj.weight.grad)
        torch.testing.assert_close(grads[0], grads[1])

    def test_keeping_attention_maps_restores_the_flag(self):
        models = [StandInDETR(), StandInDETR()]
        for m in models:
            m.keep_attention_maps = False
        with keeping_attention_maps(models, True):
            self.assertTrue(all(m.keep_attention_maps for m in models))
        self.assertFalse(any(m.keep_attention_maps for m in models))
        with keeping_attention_maps(models, False):
            self.assertFalse(any(m.keep_attention_maps for m in models))


# ------------------------------------------------------------------------- the loss formulas
B, LS, LT, Q, N, S = 2, 2, 3, 4, 3, 6


def random_maps(gen, layers, queries, heads, padding):
    self_attn = torch.randn(layers, B, heads, queries, queries, generator=gen).softmax(-1)
    logits = torch.randn(layers, B, heads, queries, S, generator=gen)
    cross = logits.masked_fill(padding[None, :, None, None], float("-inf")).softmax(-1)
    return {"self_attn": self_attn.requires_grad_(), "cross_attn": cross.requires_grad_()}


def make_context(seed, heads=(2, 2)):
    gen = torch.Generator().manual_seed(seed)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 4:] = True
    student = {"pred_logits": torch.randn(LS, B, Q, 3, generator=gen).requires_grad_(),
               "pred_boxes": random_boxes(gen, LS, B, Q).requires_grad_()}  # fmt: skip
    teacher = {"pred_logits": torch.randn(LT, B, N, 3, generator=gen),
               "pred_boxes": random_boxes(gen, LT, B, N)}  # fmt: skip
    group = {"pred_logits": torch.randn(LS, B, N, 3, generator=gen).requires_grad_(),
             "pred_boxes": random_boxes(gen, LS, B, N).requires_grad_()}  # fmt: skip
    s_maps = {"layers": random_maps(gen, LS, Q, heads[0], padding),
              "groups": [random_maps(gen, LS, N, heads[0], padding)]}  # fmt: skip
    t_maps = {"layers": random_maps(gen, LT, N, heads[1], padding), "groups": []}

    def outputs(layers, maps):
        encoder = {"memory": torch.zeros(B, S, 4), "mask": padding, "spatial_shape": (2, 3)}
        return {"layers": layers, "encoder": encoder, "attention_maps": maps}

    context = KDContext(0, [], [], outputs(student, s_maps), outputs(teacher, t_maps), False,
                        pairs=[PointPair("specific", group, {}, None)])  # fmt: skip
    context.teacher_detections = {k: v.detach() for k, v in teacher.items()}
    return context, student, teacher, group, s_maps, t_maps, padding


def np_attention_losses(context, weights=(1e4, 1e3)):
    """Both matchings' attention losses in float64: per pair set P_b of image b, the per-head
    (or head-averaged, when the head counts differ) MSE of the P_b x P_b self-attention block
    and of the memory maps summed over P_b (non-padded tokens)."""
    s_out, t_out = context.student_outputs, context.teacher_outputs
    s_maps, t_maps = s_out["attention_maps"], t_out["attention_maps"]
    keep = ~np_(s_out["encoder"]["mask"]).astype(bool)
    t_logits, t_boxes = np_(t_out["layers"]["pred_logits"]), np_(t_out["layers"]["pred_boxes"])
    out = {}
    for kind, source, maps in (("adaptive", s_out["layers"], s_maps["layers"]),
                               ("fixed", context.pairs[0].student, s_maps["groups"][0])):
        for layer in range(LS):
            t = layer + LT - LS
            sa_s, sa_t = np_(maps["self_attn"][layer]), np_(t_maps["layers"]["self_attn"][t])
            ca_s, ca_t = np_(maps["cross_attn"][layer]), np_(t_maps["layers"]["cross_attn"][t])
            if sa_s.shape[1] != sa_t.shape[1]:
                sa_s, sa_t, ca_s, ca_t = (m.mean(1, keepdims=True)
                                          for m in (sa_s, sa_t, ca_s, ca_t))  # fmt: skip
            sums = np.zeros(4)
            for b in range(B):
                if kind == "adaptive":
                    rows, cols = np_soft_match(
                        np_(source["pred_logits"][layer, b]), np_(source["pred_boxes"][layer, b]),
                        t_logits[t, b], t_boxes[t, b], False,
                    )
                else:
                    rows = cols = np.arange(N)
                rows, cols = np.asarray(rows), np.asarray(cols)
                diff = sa_s[b][:, rows][:, :, rows] - sa_t[b][:, cols][:, :, cols]
                sums[0] += (diff**2).sum()
                sums[1] += sa_s.shape[1] * len(rows) ** 2
                diff = ca_s[b][:, rows].sum(1) - ca_t[b][:, cols].sum(1)
                sums[2] += (diff[:, keep[b]] ** 2).sum()
                sums[3] += sa_s.shape[1] * keep[b].sum()
            suffix = "" if layer == LS - 1 else f"_{layer}"
            out[f"loss_kd_d3etr_{kind}_self_attn{suffix}"] = weights[0] * sums[0] / sums[1]
            out[f"loss_kd_d3etr_{kind}_cross_attn{suffix}"] = weights[1] * sums[2] / sums[3]
    return out


def attention_term(**kwargs):
    kwargs = {"self_attn_weight": 1e4, "cross_attn_weight": 1e3, **kwargs}
    term = D3ETRLoss(**kwargs)
    term.bind(StandInDETR(num_classes=3), StandInDETR(num_classes=3))
    return term


class TestAttentionLosses(unittest.TestCase):
    def check(self, got, expected):
        for key, value in expected.items():
            self.assertAlmostEqual(got[key].item(), value, delta=1e-5 * max(1.0, value), msg=key)

    def test_both_matchings_against_float64(self):
        for heads in ((2, 2), (2, 4)):  # per head; head-averaged when the counts differ
            with self.subTest(heads=heads):
                context = make_context(0, heads)[0]
                losses = attention_term()(context)
                expected = np_attention_losses(context)
                self.check(losses, expected)
                self.assertEqual(len([k for k in losses if "attn" in k]), 8)
                self.assertTrue(all(v.item() > 0 for v in losses.values()))

    def test_one_weight_alone_and_none(self):
        context = make_context(1)[0]
        expected = np_attention_losses(context, (3.0, 0.0))
        losses = attention_term(self_attn_weight=3.0, cross_attn_weight=0.0)(context)
        self.assertFalse(any("cross_attn" in k for k in losses))
        self.check(losses, {k: v for k, v in expected.items() if "self_attn" in k})
        plain = D3ETRLoss()
        self.assertNotIn("attention", plain.inputs)
        context.student_outputs.pop("attention_maps")  # today's inputs: no maps read
        self.assertFalse(any("attn" in k for k in plain(context)))

    def test_gradients_reach_the_student_only(self):
        context, student, teacher, group, s_maps, t_maps, _ = make_context(2)
        for maps in t_maps["layers"].values():
            maps.requires_grad_()
        losses = attention_term()(context)
        attn = sum(v for k, v in losses.items() if "attn" in k)
        attn.backward()
        for key in ("self_attn", "cross_attn"):
            self.assertGreater(s_maps["layers"][key].grad.abs().sum().item(), 0)
            self.assertGreater(s_maps["groups"][0][key].grad.abs().sum().item(), 0)
            self.assertIsNone(t_maps["layers"][key].grad)

    def test_grid_mismatch_and_missing_maps(self):
        context = make_context(3)[0]
        context.teacher_outputs["encoder"] = dict(context.teacher_outputs["encoder"],
                                                  spatial_shape=(3, 2))  # fmt: skip
        with self.assertRaisesRegex(RuntimeError, "D3ETRLoss.*CROSS_ATTN_WEIGHT.*grid"):
            attention_term()(context)
        self.assertTrue(attention_term(cross_attn_weight=0.0)(context))  # self-attention only
        context = make_context(3)[0]
        context.teacher_outputs.pop("attention_maps")
        with self.assertRaisesRegex(RuntimeError, "teacher.*attention maps.*'attention'"):
            attention_term()(context)

    def test_weights_must_not_be_negative(self):
        with self.assertRaisesRegex(ValueError, "D3ETRLoss.*SELF_ATTN_WEIGHT"):
            D3ETRLoss(self_attn_weight=-1.0)


class TestKDSteps(unittest.TestCase):
    def check(self, losses, kinds=("adaptive", "fixed")):
        for kind in kinds:
            for part in ("self_attn", "cross_attn"):
                for suffix in ("", "_0"):
                    value = losses[f"loss_kd_d3etr_{kind}_{part}{suffix}"]
                    self.assertTrue(math.isfinite(value) and value > 0, kind + part + suffix)

    def test_demo_pair(self):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = demo_pair_trainer(tmp, "MODEL.KD.LOSSES", "['D3ETRLoss']")
            self.assertEqual(trainer._trainer.kd_inputs, {"points", "detections", "attention"})
            trainer.resume_or_load(resume=False)
            trainer.train()
            self.check(logged_losses(trainer))
            self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))
            self.assertFalse(trainer.teacher.model.keep_attention_maps)  # for the step only
            self.assertFalse(trainer._trainer.student.keep_attention_maps)

    def test_masked_checkpointed_groups(self):
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_teacher(tmp)
            cfg = kd_student_cfg(DAB_TINY, tmp, weights,
                                 ("MODEL.DETR.GROUP_DECODING", "masked",
                                  "MODEL.DETR.GROUP_CHECKPOINT", "True"))  # fmt: skip
            cfg.merge_from_list(
                ["MODEL.KD.LOSSES", "['D3ETRLoss']", "MODEL.KD.GENERAL.ENABLED", "False"]
            )
            trainer, losses, _, s_calls = run_kd_step(cfg, DAB_TINY, [])
        self.check(losses)
        self.assertEqual(len(s_calls[0]["kwargs"]["extra_query_groups"]), 1)
        self.assertTrue(all(p.grad is None for p in trainer.teacher.parameters()))


if __name__ == "__main__":
    unittest.main()
