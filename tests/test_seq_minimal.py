"""Minimal attention (arXiv 2410.13732): every form against its naive twin and the paper's identities."""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.seq_minimal import MinimalAttention
from attnkit.ops.sequence.minimal import minimal_attention, minimal_scores
from attnkit.reference.naive_sequence import naive_minimal_attention
from tolerances import assert_close, compare_fn

B, N, C = 2, 9, 8


def _w(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / C ** 0.5


@pytest.mark.parametrize("qk", ["separate", "collapsed", "shared", "cholesky"])
@pytest.mark.parametrize("vo", ["separate", "collapsed", "identity"])
@pytest.mark.parametrize("causal", [False, True])
def test_op_matches_naive(qk, vo, causal):
    H = 2
    inputs = {"x": _w((B, N, C), 0) * C ** 0.5,
              "qk_weight": _w({"separate": (2, C, C), "collapsed": (H, C, C)}.get(qk, (C, C)), 1)}
    if vo != "identity":
        inputs["vo_weight"] = _w((2, C, C) if vo == "separate" else (H, C, C), 2)
    kw = dict(num_heads=H, qk=qk, vo=vo, causal=causal)
    compare_fn(lambda **a: minimal_attention(**a, **kw), lambda **a: naive_minimal_attention(**a, **kw),
               inputs, torch.float32)


@pytest.mark.parametrize("qk", ["shared", "cholesky"])
def test_shared_weights_give_a_symmetric_score_matrix_with_nonnegative_diagonal(qk):
    x = _w((B, N, C), 0)
    s = minimal_scores(x, _w((C, C), 1), num_heads=2, qk=qk)
    assert torch.equal(s, s.transpose(-1, -2)) or (s - s.transpose(-1, -2)).abs().max() < 1e-14
    assert (s.diagonal(dim1=-2, dim2=-1) >= 0).all()
    sep = minimal_scores(x, _w((2, C, C), 1), num_heads=2, qk="separate")
    assert (sep - sep.transpose(-1, -2)).abs().max() > 1e-3  # separate W_Q, W_K are not symmetric


def test_collapsed_equals_separate_with_w_qk_the_product():
    x = _w((B, N, C), 0)
    wq, wk = _w((C, C), 1), _w((C, C), 2)
    sep = minimal_scores(x, torch.stack([wq, wk]), num_heads=1, qk="separate")
    col = minimal_scores(x, (wq @ wk.T).unsqueeze(0), num_heads=1, qk="collapsed")
    assert_close(col, sep, torch.float64, "scores")


def test_identity_vo_is_a_convex_mixture():
    x = _w((B, N, C), 0)
    y = minimal_attention(x, _w((C, C), 1), num_heads=2, qk="shared", vo="identity")
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    assert ((y >= lo - 1e-12) & (y <= hi + 1e-12)).all()


def test_stack_without_vo_is_a_product_of_row_stochastic_maps():
    x = _w((1, N, C), 0)
    layers = [MinimalAttention(C, 1, qk="shared", vo="identity").double() for _ in range(3)]
    z, prod = x, torch.eye(N, dtype=torch.float64)
    for m in layers:
        a = torch.softmax(minimal_scores(z, m.qk_weight, qk="shared")[0, 0], -1)
        assert_close(a.sum(-1), torch.ones(N, dtype=torch.float64), torch.float64, "row sums")
        prod = a @ prod
        z = m(z)
    assert_close(z[0], prod @ x[0], torch.float64, "A_S ... A_1 x")


def test_parameter_counts_shrink():
    n = {f: sum(p.numel() for p in MinimalAttention(C, 1, qk=f, vo="identity").parameters())
         for f in ("separate", "collapsed", "shared")}
    assert n == {"separate": 2 * C * C, "collapsed": C * C, "shared": C * C}
    assert sum(p.numel() for p in MinimalAttention(C, 1, qk="shared", vo="separate").parameters()) == 3 * C * C
