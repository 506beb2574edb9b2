"""Sparsifiner (arXiv 2303.13755) and Orion-MSP (arXiv 2511.02818): the ops against their naive twins (output
and every gradient, each backend), the papers' identities, and the modules' predictor / mask properties."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.mechanisms.orion_msp import OrionMSPAttention
from attnkit.mechanisms.sparsifiner import SparsifinerAttention
from attnkit.ops.routed.orion import orion_msp_attention, orion_msp_mask, random_layout
from attnkit.ops.routed.sparsifiner import block_connectivity, sparsifiner_attention, token_connectivity
from attnkit.reference.naive_sparse2 import (
    naive_masked_attention,
    naive_orion_mask,
    naive_orion_msp,
    naive_sparsifiner,
    naive_sparsifiner_mask,
    naive_sparsifiner_module,
)
from tolerances import assert_close, compare_fn


def _qkv(B=2, N=40, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for n in "qkv"}


def _predictor(B=2, N=40, H=2, R=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    coef = torch.softmax(torch.randn(B, N, H, R, generator=g, dtype=torch.float64) * 2, -1)  # (B, N, H, R)
    basis = torch.rand(R, N, generator=g, dtype=torch.float64)                               # (R, N)
    basis = torch.where(basis > 0.3, basis, torch.zeros(()))  # a thresholded basis: exact zeros, ties
    return coef, basis


def _dense(q, k, v):
    return naive_masked_attention(q, k, v, torch.ones(q.shape[1], k.shape[1], dtype=torch.bool))


# ------------------------------------------------------------------------------------------- Sparsifiner


_SPAR_CASES = [
    (40, 10, "token", 64, 1, "tiles"), (100, 25, "token", 64, 0, "tiles"), (40, 10, "token", 64, 1, "masked"),
    (70, 20, "block", 16, 1, "gather"), (130, 40, "block", 64, 0, "gather"), (70, 20, "block", 16, 0, "masked"),
]


# the tile kernel takes float32 / half only (float64 runs the masked backend)
@pytest.mark.parametrize("N,top_k,gran,block,cls,backend,dtype", [
    (*c, dt) for c in _SPAR_CASES for dt in (torch.float64, torch.float32) if c[-1] != "tiles" or dt != torch.float64])
def test_sparsifiner_op_matches_naive(N, top_k, gran, block, cls, backend, dtype):
    coef, basis = _predictor(N=N)
    kw = dict(top_k=top_k, granularity=gran, block_size=block, cls_tokens=cls)
    # coef / basis stay float64 on both sides: the same scores, so the same top-k
    compare_fn(lambda q, k, v: sparsifiner_attention(q, k, v, coef, basis, backend=backend, **kw),
               lambda q, k, v: naive_sparsifiner(q, k, v, coef, basis, top_k=top_k, granularity=gran, block=block,
                                                 cls_tokens=cls),
               _qkv(N=N), dtype)


@pytest.mark.parametrize("gran", ["token", "block"])
def test_sparsifiner_keep_all_is_dense(gran):
    t = _qkv(N=70)
    coef, basis = _predictor(N=70)
    out = sparsifiner_attention(t["q"].float(), t["k"].float(), t["v"].float(), coef, basis, top_k=70,
                                granularity=gran, block_size=16)
    assert_close(out, _dense(t["q"], t["k"], t["v"]), torch.float32, "top_k = N vs dense")


def test_sparsifiner_rows_keep_exactly_k():
    coef, basis = _predictor(N=40)
    m = token_connectivity(coef, basis, 7, cls_tokens=1)  # (B, H, N, N)
    assert (m[:, :, 1:].sum(-1) == 7).all() and m[:, :, 0].all()
    assert torch.equal(m, naive_sparsifiner_mask(coef, basis, 7, cls_tokens=1))
    # the block layout keeps ceil(top_k / block) key blocks per query block, chosen by the tile-mean score
    lay = block_connectivity(coef, basis, 20, 16)  # (B, H, 3, 3)
    assert (lay.sum(-1) == 2).all()
    full = naive_sparsifiner_mask(coef, basis, 20, granularity="block", block=16)
    assert torch.equal(lay.repeat_interleave(16, 2).repeat_interleave(16, 3)[..., :40, :40], full)


def test_sparsifiner_mask_ignores_values_and_gets_no_gradient():
    t = _qkv(N=40)
    coef, basis = _predictor(N=40)
    coef.requires_grad_()
    a = sparsifiner_attention(t["q"], t["k"], t["v"], coef, basis, top_k=9)
    b = sparsifiner_attention(t["q"], t["k"], t["v"] * 3, coef, basis, top_k=9)
    assert_close(b, 3 * a, torch.float64, "linear in v (the mask does not read v)")
    assert not a.requires_grad, "coef requires grad, yet the output does not depend on it differentiably"


def test_sparsifiner_predictor_identity():
    """Reduction factor 1, W_n = I and U = I: M~ = C, the reduced-channel softmax attention itself."""
    m = SparsifinerAttention(16, 2, 12, reduce_n_factor=1, cls_tokens=0).double()
    with torch.no_grad():
        m.proj_n.copy_(torch.eye(12))
        m.proj_back_n.copy_(torch.eye(12))
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    q, k, _ = m.qkv(x).view(2, 12, 3, 2, 8).unbind(2)  # (B, N, H, D)
    s = torch.einsum("bnhc,bmhc->bhnm", m.proj_c_q(q), m.proj_c_k(k)) * m.coef_scale
    assert_close(m.connectivity(x), torch.softmax(s, -1), torch.float64, "M~ = C")


def test_sparsifiner_module_twin_short_input_and_predictor_gradient():
    torch.manual_seed(0)
    m = SparsifinerAttention(16, 2, 40, keep_rate=0.3, reduce_n_factor=4).double()
    x = torch.randn(2, 33, 16, dtype=torch.float64, requires_grad=True)  # N < num_tokens: first 33 rows
    y = m(x)
    assert_close(y, naive_sparsifiner_module(m, x), torch.float64, "module vs twin")
    grads = torch.autograd.grad(y.sum(), [m.proj_c_q.weight, m.proj_n, m.qkv.weight], allow_unused=True)
    assert grads[0] is None and grads[1] is None and grads[2].abs().sum() > 0  # mask detached
    g = torch.autograd.grad(m.connectivity(x).sum(), [m.proj_n], allow_unused=True)[0]
    assert g is not None and g.abs().sum() > 0  # the reconstruction path trains the predictor
    with pytest.raises(ValueError, match=r"SparsifinerAttention.*num_tokens"):
        m(torch.randn(1, 41, 16, dtype=torch.float64))


def test_sparsifiner_errors():
    t = _qkv(N=20)
    coef, basis = _predictor(N=20)
    with pytest.raises(ValueError, match="sparsifiner_attention: coef"):
        sparsifiner_attention(t["q"], t["k"], t["v"], coef[:, :10], basis, top_k=3)
    with pytest.raises(ValueError, match="sparsifiner_attention: basis"):
        sparsifiner_attention(t["q"], t["k"], t["v"], coef, basis[:, :10], top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        sparsifiner_attention(t["q"], t["k"], t["v"], coef, basis, top_k=21)
    with pytest.raises(ValueError, match="granularity"):
        sparsifiner_attention(t["q"], t["k"], t["v"], coef, basis, top_k=3, granularity="row")
    with pytest.raises(ValueError, match="cannot run"):
        sparsifiner_attention(t["q"], t["k"], t["v"], coef, basis, top_k=3, backend="gather")


# ---------------------------------------------------------------------------------------------- Orion-MSP


@pytest.mark.parametrize("N,ns,w,r,rb", [(40, 6, 4, 0, 1), (40, 6, 4, 3, 1), (100, 3, 2, 2, 16),
                                         (130, 6, 5, 2, 64), (30, 0, 0, 0, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orion_op_matches_naive(N, ns, w, r, rb, dtype):
    kw = dict(num_special=ns, window=w, num_random=r, random_block=rb, seed=3)
    compare_fn(lambda q, k, v: orion_msp_attention(q, k, v, **kw), lambda q, k, v: naive_orion_msp(q, k, v, **kw),
               _qkv(N=N), dtype)


def test_orion_window_covering_everything_is_dense():
    t = _qkv(N=50)
    out = orion_msp_attention(t["q"], t["k"], t["v"], num_special=4, window=50, num_random=3)
    assert_close(out, _dense(t["q"], t["k"], t["v"]), torch.float64, "window >= N vs dense")


def test_orion_no_specials_no_window_is_identity():
    t = _qkv(N=30)
    out = orion_msp_attention(t["q"], t["k"], t["v"], num_special=0, window=0)
    assert_close(out, t["v"], torch.float64, "diagonal attention returns v")


def test_orion_mask_structure():
    n = 45
    plain = orion_msp_mask(n, 5, 3).to_dense(n, n)
    assert torch.equal(plain, plain.t()), "no random links: symmetric"
    assert orion_msp_mask(n, 5, 3).count(n, n) == int(naive_orion_mask(n, 5, 3).sum())  # exact density
    a = orion_msp_mask(n, 5, 3, 4, 1, 7).to_dense(n, n)
    assert torch.equal(a, orion_msp_mask(n, 5, 3, 4, 1, 7).to_dense(n, n))  # seeded: deterministic
    assert not torch.equal(a, orion_msp_mask(n, 5, 3, 4, 1, 8).to_dense(n, n))
    lay = random_layout(n, 5, 4, 1, 7)
    assert (lay[5:].sum(-1) == 4).all() and not lay[:5].any() and not lay[:, :5].any()
    blk = random_layout(130, 6, 2, 16, 0)  # 9 blocks of 16, the first non-special one is block 0
    assert (blk.sum(-1) == 2).all()


def test_orion_random_links_follow_the_released_rule():
    """random_block=1: per non-special query, randperm(L - n_special)[:n_rand] + n_special, in query order."""
    n, ns, r, seed = 30, 6, 3, 5
    torch.manual_seed(seed)
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(ns, n):
        want[i, torch.randperm(n - ns)[:r] + ns] = True
    assert torch.equal(random_layout(n, ns, r, 1, seed), want)


def test_orion_module_twin_and_errors():
    torch.manual_seed(0)
    m = OrionMSPAttention(16, 2, num_special=3, window=2, num_random=2, random_block=4).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    assert_close(m(x), naive_orion_msp_twin(m, x), torch.float64, "module vs twin")
    with pytest.raises(ValueError, match="OrionMSPAttention: window"):
        OrionMSPAttention(16, 2, window=-1)
    with pytest.raises(ValueError, match="orion_msp_attention: num_special"):
        t = _qkv(N=10)
        orion_msp_attention(t["q"], t["k"], t["v"], num_special=-1, window=2)


def naive_orion_msp_twin(m, x):
    from attnkit.reference.naive_sparse2 import naive_orion_msp_module

    return naive_orion_msp_module(m, x)


def test_density_helpers_agree():
    n = 200
    m = orion_msp_mask(n, 6, 4, 2, 16, 0)
    assert math.isclose(m.density(n, n), naive_orion_mask(n, 6, 4, 2, 16, 0).double().mean().item())
