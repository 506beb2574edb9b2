"""attnkit.analysis.interventions: pruning/selection/merging against materialized selections, identities of
the attention edits (ZeroTuning, re-balancing, reversed attention), edits inside attnkit modules."""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.analysis import capture
from attnkit.analysis import interventions as iv
from attnkit.mechanisms.mha import MultiHeadAttention


def _probs(b=2, h=3, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, n, generator=g, dtype=torch.float64).mul(2).softmax(-1)


def test_cls_prune_topk_order_and_identity():
    a = _probs(n=9)
    x = torch.randn(2, 8, 4, dtype=torch.float64)
    kept, idx = iv.cls_prune(x, a, 0.5)
    assert idx.shape == (2, 4) and (idx.diff(dim=-1) > 0).all()
    score = a[:, :, 0, 1:].mean(1)
    for b in range(2):
        assert set(idx[b].tolist()) == set(score[b].topk(4).indices.tolist())
        torch.testing.assert_close(kept[b], x[b, idx[b]])
    same, idx1 = iv.cls_prune(x, a[:, :, 0], 1.0)                                  # 0% pruned: nothing changes
    assert torch.equal(same, x) and torch.equal(idx1, torch.arange(8).expand(2, 8))


def test_fastv_lscene_adatoken():
    a = _probs(n=10)
    cand = torch.arange(2, 8)                                                       # "image" tokens 2..7
    keep = iv.fastv_prune(a, cand, 0.5)
    received = a.mean((1, 2))
    for b in range(2):
        dropped = set(range(10)) - set(keep[b].tolist())
        top = set(cand[received[b, cand].topk(3).indices].tolist())
        assert dropped == set(cand.tolist()) - top
    assert torch.equal(iv.fastv_prune(a, cand, 1.0), torch.arange(10).expand(2, 10))
    sel = iv.lscene_select(a, [8, 9], cand, k=2)
    s = a[:, :, 8:10][..., 2:8].mean((1, 2))
    assert sel.tolist() == [sorted((s[b].topk(2).indices + 2).tolist()) for b in range(2)]
    c = iv.adatoken_contribution(a, [8, 9], cand)
    torch.testing.assert_close(c.sum(-1), torch.ones(2, dtype=torch.float64))
    assert all(torch.equal(k, torch.arange(10)) for k in iv.adatoken_prune(a, [8, 9], cand, tau=0.0))
    pruned = iv.adatoken_prune(a, [8, 9], cand, tau=0.2)
    assert all(set(k.tolist()) == set(range(10)) - set(cand[c[b] < 0.2].tolist()) for b, k in enumerate(pruned))


def test_fastvggt_merge_unmerge():
    torch.manual_seed(0)
    x = torch.randn(2, 3 * 12, 8)
    dst = iv.fastvggt_destinations(x, num_frames=3, num_special=2, merge_ratio=0.5, salient_ratio=0.0)
    assert dst[:, :12].all() and dst[:, 12:14].all() and dst[:, 24:26].all()     # frame 0 and special tokens
    merged, assign = iv.merge_tokens(x, dst)
    assert merged.shape == (2, int(dst[0].sum()), 8)
    back = iv.unmerge_tokens(merged, assign)
    assert back.shape == x.shape
    attn = MultiHeadAttention(8, 2).eval()
    with torch.no_grad():
        full = iv.merged_attention(x, attn, torch.ones(2, 36, dtype=torch.bool))  # nothing merged: exact
        torch.testing.assert_close(full, attn(x))
        y = iv.merged_attention(x, attn, dst)
    assert y.shape == x.shape
    for b in range(2):                                                            # merged tokens share an output
        src = (~dst[b]).nonzero()[0, 0]
        d = dst[b].nonzero()[:, 0][assign[b, src]]
        torch.testing.assert_close(y[b, src], y[b, d])


def test_zerotuning_identities_and_logit_form():
    a = _probs()
    torch.testing.assert_close(iv.zerotuning_scale(a, 1.0), a)
    for gamma in (0.5, 3.0):
        e = iv.zerotuning_scale(a, gamma)
        torch.testing.assert_close(e.sum(-1), torch.ones_like(e.sum(-1)))
        torch.testing.assert_close(e[..., 2] / e[..., 5], a[..., 2] / a[..., 5])   # ratios of the others kept
        logits = a.log() + iv.zerotuning_bias(a.shape[-1], gamma).double()
        torch.testing.assert_close(e, logits.softmax(-1))
    per_head = iv.zerotuning_scale(a, torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(per_head[:, [0, 2]], a[:, [0, 2]])


def test_rebalance_identity_and_logit_form():
    a = _probs()
    torch.testing.assert_close(iv.rebalance_attention(a, [1, 2], [5], 0.0, 0.0), a)
    e = iv.rebalance_attention(a, [1, 2], [5], 0.7, 1.3, heads=[1])
    bias = torch.zeros(9, dtype=torch.float64)
    bias[[1, 2]] += 0.7
    bias[5] += 1.3
    torch.testing.assert_close(e[:, 1], (a[:, 1].log() + bias).softmax(-1))
    torch.testing.assert_close(e[:, [0, 2]], a[:, [0, 2]])


def test_reversed_attention_and_dependency_tree():
    a = _probs(b=1, h=2, n=6)
    v = torch.randn(1, 6, 2, 3, dtype=torch.float64)
    m = torch.rand(1, 6, dtype=torch.float64)
    out = iv.reversed_attention(a, v, m)
    want = torch.zeros_like(v)
    for j in range(6):
        for i in range(6):
            want[0, j] += a[0, :, i, j, None] * m[0, i] * v[0, i]
    torch.testing.assert_close(out, want)
    ones = torch.ones(1, 6, 2, 1, dtype=torch.float64)                              # each sender's mass = m_i
    sent = iv.reversed_attention(a, ones, m).sum(1)[0, :, 0]
    torch.testing.assert_close(sent, m.sum().expand(2))
    sym = (a + a.transpose(-1, -2)) / 2                                             # symmetric: reversed == forward
    torch.testing.assert_close(iv.reversed_attention(sym, v), torch.einsum("bhij,bjhd->bihd", sym, v))
    parent = iv.dependency_tree(a)
    assert (parent == -1).sum() == 1 and parent.shape == (1, 6)
    assert all(p != i for i, p in enumerate(parent[0].tolist()))


def test_edit_attention_in_attnkit_modules():
    torch.manual_seed(0)
    blocks = nn.Sequential(MultiHeadAttention(16, 4, causal=True), MultiHeadAttention(16, 4, causal=True))
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        base = blocks(x)
        with iv.edit_attention(blocks, lambda _l, p: iv.zerotuning_scale(p, 1.0)):
            same = blocks(x)
        with iv.edit_attention(blocks, lambda _l, p: iv.zerotuning_scale(p, math.e), layers=[1]):
            changed = blocks(x)
            with capture(blocks, layers=[0]) as maps:                               # capture inside an edit
                blocks(x)
    torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-6)
    assert (changed - base).abs().max() > 1e-3
    assert maps.get(0).shape == (2, 4, 7, 7)
    from attnkit.mechanisms import mha
    from attnkit.ops.dense.call import attention
    assert mha.attention is attention
    gates = torch.zeros(2, 4)
    with torch.no_grad(), iv.edit_attention(blocks, iv.gate_heads_fn(gates)):
        zero = blocks(x)                                                          # every head gated off
    torch.testing.assert_close(zero, torch.zeros_like(zero))
