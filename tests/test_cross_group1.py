"""Video-CCAM, DCAL (GLCA, PWCA), CrossLMM, FILIP, GreenPLM: ops against their naive twins, each paper's identities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.masks.cross import frame_causal
from attnkit.mechanisms.cross_crosslmm import CrossLMMBlock
from attnkit.mechanisms.cross_dcal import GlobalLocalCrossAttention, PairwiseCrossAttention
from attnkit.mechanisms.cross_video_ccam import VideoCCAMAttention
from attnkit.ops.cross import attention_rollout, filip_similarity, glca_attention, zero_param_pool
from attnkit.reference.naive_dense import naive_attention
from tolerances import assert_close, nudged_double

F64 = torch.float64


def _rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_() if grad else t


def _grads_match(out, ref, inputs, names):
    g = torch.randn_like(ref)
    for name, a, b in zip(names, torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert_close(a, b, F64, f"d{name}", grad=True)


# ---------------------------------------------------------------------------------------- Video-CCAM


def test_video_ccam_one_frame_is_full_cross_attention_and_queries_ignore_later_frames():
    m = nudged_double(VideoCCAMAttention(8, 2, tokens_per_frame=3))
    x, ctx = _rand(2, 6, 8), _rand(2, 12, 8, seed=1, grad=True)                # T = 4 frames of 3 tokens
    y = m(x, ctx)
    (g,) = torch.autograd.grad(y[:, 0].sum(), ctx)                              # query 0 sees frame 0 only
    assert g[:, 3:].abs().max() == 0 and g[:, :3].abs().max() > 0
    (g,) = torch.autograd.grad(m(x, ctx)[:, -1].sum(), ctx)                     # the last query sees every frame
    assert (g.abs().sum(-1) > 0).all()
    one = nudged_double(VideoCCAMAttention(8, 2, tokens_per_frame=12))                # T = 1: full cross-attention
    q = one.q_proj(x).view(2, 6, 2, 4)
    k, v = one.k_proj(ctx).view(2, 12, 2, 4), one.v_proj(ctx).view(2, 12, 2, 4)
    assert_close(one(x, ctx), one.out_proj(naive_attention(q, k, v).reshape(2, 6, 8)), F64, "T = 1")
    assert frame_causal(6, 4, 3).to_dense(6, 12)[0].sum() == 3


# ---------------------------------------------------------------------------------------------- DCAL


def test_glca_op_gather_matches_reference_and_all_rows_is_self_attention():
    q, k, v = (_rand(2, n, 2, 4, seed=s, grad=True) for s, n in enumerate((7, 9, 9)))
    scores = _rand(2, 7, seed=5)
    out, idx = glca_attention(q, k, v, scores, 3)
    ref, ridx = glca_attention(q, k, v, scores, 3, backend="reference")
    assert torch.equal(idx, ridx) and torch.equal(idx, scores.topk(3).indices)
    assert_close(out, ref, F64, "out")
    _grads_match(out, ref, (q, k, v), "qkv")
    full, fidx = glca_attention(q, k, v, scores, 7)                             # R = N: every self-attention row
    order = fidx.argsort(1)
    rows = full.gather(1, order[:, :, None, None].expand_as(full))
    assert_close(rows, naive_attention(q, k, v), F64, "R = N")
    assert "gather" in ak.explain("glca_attention", q, k, v, scores=scores, topk=3)
    with pytest.raises(ValueError, match=r"topk \(8\) must be <= Nq \(7\)"):
        glca_attention(q, k, v, scores, 8)


def test_attention_rollout_rows_sum_to_one_and_one_layer_is_the_mix():
    maps = torch.softmax(_rand(3, 2, 5, 5), -1)
    r = attention_rollout(maps)
    assert_close(r.sum(-1), torch.ones(2, 5, dtype=F64), F64, "row sums")
    assert_close(attention_rollout(maps[:1]), 0.5 * maps[0] + 0.5 * torch.eye(5, dtype=F64), F64, "one layer")
    expected = (0.5 * maps[2] + 0.5 * torch.eye(5)) @ (0.5 * maps[1] + 0.5 * torch.eye(5)) @ (
        0.5 * maps[0] + 0.5 * torch.eye(5))
    assert_close(r, expected, F64, "three layers")


def test_glca_module_keeps_cls_selects_by_rollout_and_full_ratio_is_self_attention():
    m = nudged_double(GlobalLocalCrossAttention(8, 2, ratio=1.0))
    x = _rand(2, 6, 8)
    q, k, v = (t.view(2, 6, 2, 4) for t in m.qkv(x).chunk(3, -1))
    assert_close(m(x), m.proj(naive_attention(q, k, v).reshape(2, 6, 8)), F64, "ratio 1: every row")
    m.ratio = 0.2                                                               # R = 1 + 1
    rollout = torch.tensor([[0.0, 0.1, 0.9, 0.2, 0.3, 0.4], [5.0, 0.0, 0.0, 0.0, 0.0, 1.0]], dtype=F64)
    y = m(x, rollout)
    nonzero = (y.abs().sum(-1) > 0)
    assert nonzero.tolist() == [[True, False, True, False, False, False], [True, False, False, False, False, True]]
    full = m.proj(naive_attention(q, k, v).reshape(2, 6, 8))
    assert_close(y[nonzero], full[nonzero], F64, "selected rows attend to every key")


def test_pwca_with_itself_as_distractor_is_self_attention():
    m = nudged_double(PairwiseCrossAttention(8, 2))
    x = _rand(1, 6, 8)
    q, k, v = (t.view(1, 6, 2, 4) for t in m.qkv(x).chunk(3, -1))
    self_attn = m.proj(naive_attention(q, k, v).reshape(1, 6, 8))
    assert_close(m(x, x), self_attn, F64, "I2 = I1")
    assert_close(m(x), self_attn, F64, "B = 1 rolls onto itself")
    xb = _rand(3, 6, 8, seed=2)
    assert_close(m(xb), m(xb, xb.roll(1, 0)), F64, "default distractor: the batch rolled by one")
    assert (m(xb, xb) - m(xb)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ CrossLMM


def test_crosslmm_gate_zero_is_the_identity_and_frames_stay_local():
    torch.manual_seed(0)
    m = CrossLMMBlock(8, 2, num_frames=3).double()
    x, ctx = _rand(2, 6, 8), _rand(2, 9, 8, seed=1, grad=True)
    assert torch.equal(m(x, ctx), x)                                            # gate initialised to 0
    m = nudged_double(m)
    y = m(x, ctx)
    (g,) = torch.autograd.grad(y[:, :2].sum(), ctx)                             # frame 0: queries 0-1, keys 0-2
    assert g[:, 3:].abs().max() == 0 and g[:, :3].abs().max() > 0
    glob = nudged_double(CrossLMMBlock(8, 2, local="global"))
    (g,) = torch.autograd.grad(glob(x, ctx)[:, :1].sum(), ctx)
    assert (g.abs().sum(-1) > 0).all()


# --------------------------------------------------------------------------------------------- FILIP


def test_filip_matches_reference_and_gradients():
    x, y = _rand(3, 5, 8, grad=True), _rand(4, 6, 8, seed=1, grad=True)
    ym = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    ym[:, 0] = True
    a = filip_similarity(x, y, y_mask=ym, chunk=3)
    b = filip_similarity(x, y, y_mask=ym, backend="reference")
    for name, s, r in zip(("s_i2t", "s_t2i"), a, b):
        assert_close(s, r, F64, name)
    g = [torch.randn_like(t) for t in a]
    for name, ga, gb in zip("xy", torch.autograd.grad(a, (x, y), g), torch.autograd.grad(b, (x, y), g)):
        assert_close(ga, gb, F64, f"d{name}", grad=True)


def test_filip_identities():
    x, y = _rand(3, 1, 8), _rand(4, 1, 8, seed=1)
    s_i2t, s_t2i = filip_similarity(x, y)                                       # one token a side: CLIP's cosine
    cos = F.normalize(x[:, 0], dim=-1) @ F.normalize(y[:, 0], dim=-1).T
    assert_close(s_i2t, cos, F64, "i2t")
    assert_close(s_t2i, cos, F64, "t2i")
    x, y = _rand(2, 5, 8), _rand(3, 7, 8, seed=1)
    s_i2t, s_t2i = filip_similarity(x, y)
    assert (s_i2t - s_t2i).abs().max() > 1e-3                                   # max-then-mean is asymmetric
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    assert_close(filip_similarity(x[:, perm], y)[0], s_i2t, F64, "permuted patches")
    padded = torch.cat([y, _rand(3, 2, 8, seed=9) * 50], 1)
    mask = torch.cat([torch.ones(3, 7, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool)], 1)
    for got, want in zip(filip_similarity(x, padded, y_mask=mask), (s_i2t, s_t2i)):
        assert_close(got, want, F64, "padding words change nothing")


# ------------------------------------------------------------------------------------------ GreenPLM


def test_zero_param_pool_matches_reference_and_identities():
    t = _rand(2, 9, 8, grad=True)
    out, ref = zero_param_pool(t), zero_param_pool(t, backend="reference")
    assert out.shape == (2, 3, 8) and torch.equal(out[:, 0], t[:, 0])
    assert_close(out, ref, F64, "out")
    _grads_match(out, ref, (t,), ["tokens"])
    same = _rand(2, 1, 8).expand(2, 9, 8)
    assert_close(zero_param_pool(same, cls=False), same[:, :2], F64, "identical tokens")
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)) + 1
    shuffled = torch.cat([t[:, :1], t[:, perm]], 1)
    assert_close(zero_param_pool(shuffled), out, F64, "token order")
    assert_close(zero_param_pool(t, ("mean",), cls=False, scale=0.0), t.mean(1, keepdim=True), F64, "scale 0: mean")
