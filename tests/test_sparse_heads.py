"""Head-level mechanisms vs their naive references: MoH, LSSA/LSSAR, GAAM, RCMHA, SHSA."""

import pytest
import torch

import attnkit as ak
from attnkit.mechanisms.gaussian_adaptive import GaussianAdaptiveAttention
from attnkit.mechanisms.moh import MoHAttention
from attnkit.mechanisms.rcmha import RCMHA
from attnkit.mechanisms.single_head import SingleHeadAttention
from attnkit.ops.dense.gaussian import gaussian_adaptive
from attnkit.ops.dense.relative import relative_position_attention
from attnkit.ops.dense.softplus import softplus_attention
from attnkit.ops.per_head.moh import moh_gates
from attnkit.reference.naive_dense import (
    causal_dense,
    naive_gaam,
    naive_lssa,
    naive_masked_attention,
    naive_relative_attention,
)
from attnkit.reference.naive_per_head import naive_moh_gates
from tolerances import DTYPES, compare_fn


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mha_ref(m_qkv, m_proj, x, H, causal):
    b, n, c = x.shape
    q, k, v = m_qkv(x).view(b, n, 3, H, c // H).unbind(2)
    o, _ = naive_masked_attention(q, k, v, causal_dense(n, n) if causal else None)
    return m_proj(o.reshape(b, n, c))


# ---- MoH -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moh_gates_match_reference(dtype):
    ins = {"x": _r(2, 5, 8), "w_h": _r(8, 2, seed=1), "w_s": _r(8, 2, seed=2), "w_r": _r(8, 6, seed=3)}
    compare_fn(lambda x, w_h, w_s, w_r: moh_gates(x, w_h, w_s, w_r, 3),
               lambda x, w_h, w_s, w_r: naive_moh_gates(x, w_h, w_s, w_r, 3), ins, dtype, factor=2.0)


def test_moh_gate_count_and_balance_loss():
    x, wr = _r(2, 7, 8), _r(8, 6, seed=1)
    g, _ = moh_gates(x, _r(8, 2), _r(8, 2, seed=2), wr, 3)
    assert ((g != 0).sum(-1) == 2 + 3).all()  # h_s + K active heads per token
    _, lb = moh_gates(x, None, None, torch.zeros(8, 6, dtype=torch.float64), 4)
    assert lb.item() == pytest.approx(4 / 6)  # uniform P: sum_j f_j / h_r = K / h_r


@pytest.mark.parametrize("shared", [4, 0], ids=["all-shared", "all-routed"])
def test_moh_all_heads_uniform_equals_mha(shared):
    torch.manual_seed(0)
    m = MoHAttention(16, 4, shared_heads=shared, topk=4 - shared or None, causal=True).double()
    with torch.no_grad():
        for w in (m.w_s, m.w_r):
            if w is not None:
                w.zero_()
    x = _r(2, 6, 16)
    torch.testing.assert_close(m(x), _mha_ref(m.qkv, m.proj, x, 4, True), rtol=1e-10, atol=1e-10)


def test_moh_gradcheck_and_bad_config():
    torch.manual_seed(0)
    m = MoHAttention(8, 4, shared_heads=1, topk=2).double()
    x = _r(1, 4, 8).requires_grad_()
    torch.autograd.gradcheck(lambda x: m(x), (x,), fast_mode=True)
    with pytest.raises(ValueError, match="topk"):
        MoHAttention(8, 4, shared_heads=1, topk=4)
    with pytest.raises(ValueError, match="shared_heads"):
        MoHAttention(8, 4, shared_heads=5)


# ---- LSSA / LSSAR --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,p", [(True, None), (True, 15.0), (False, 3.0)],
                         ids=["lssa-causal", "lssar15", "lssar3-nc"])
def test_lssa_matches_reference(causal, p, dtype):
    ins = {"q": _r(2, 9, 4, 8), "k": _r(2, 9, 2, 8, seed=1), "v": _r(2, 9, 2, 6, seed=2)}
    factor = 4.0 if p == 15.0 and dtype in (torch.float16, torch.bfloat16) else 1.0  # ^15 amplifies rounding
    compare_fn(lambda q, k, v: softplus_attention(q, k, v, causal=causal, p=p),
               lambda q, k, v: naive_lssa(q, k, v, causal=causal, p=p), ins, dtype, factor=factor)


def test_lssa_identities():
    q, k = _r(1, 12, 2, 8), _r(1, 12, 2, 8, seed=1)
    eye = torch.eye(12, dtype=torch.float64).view(1, 12, 1, 12).expand(1, 12, 2, 12)  # v = I reads the weights
    a = softplus_attention(q, k, eye)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 12, 2, dtype=torch.float64))
    assert (a.transpose(1, 2).triu(1) == 0).all()  # causal weights
    torch.testing.assert_close(softplus_attention(q, k, eye, p=1.0, offset=0.0), a)  # O=0, p=1: LSSAR = LSSA
    torch.testing.assert_close(softplus_attention(3 * q, 0.5 * k, eye, p=15.0), softplus_attention(q, k, eye, p=15.0))
    big = softplus_attention(*(torch.randn(1, 600, 1, 16) for _ in range(3)), p=15.0)
    assert torch.isfinite(big).all()  # N^15 would overflow fp32 without the row-max division


def test_lssa_gradcheck():
    ins = tuple(_r(1, 5, 1, 4, seed=s).requires_grad_() for s in range(3))
    torch.autograd.gradcheck(lambda q, k, v: softplus_attention(q, k, v, p=3.0), ins, fast_mode=True)


# ---- GAAM ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g,axis", [(1, 1), (3, 1), (2, -1)], ids=["single-tokens", "mix3-tokens", "mix2-features"])
def test_gaam_matches_reference(g, axis, dtype):
    ins = {"x": _r(2, 7, 12), "offsets": 0.3 * _r(3, g, seed=1), "widths": 1.5 + _r(3, g, seed=2).abs(),
           "mix": _r(3, g, seed=3) if g > 1 else None}
    compare_fn(lambda x, offsets, widths, mix: gaussian_adaptive(x, offsets, widths, mix, axis=axis, normalize=g > 1),
               lambda x, offsets, widths, mix: naive_gaam(x, offsets, widths, mix, axis, g > 1), ins, dtype)


def test_gaam_identities():
    x = _r(2, 16, 8)
    wide = gaussian_adaptive(x, torch.zeros(2, 1, dtype=torch.float64), torch.full((2, 1), 1e6, dtype=torch.float64))
    torch.testing.assert_close(wide, x)  # c -> inf: G -> 1
    m = GaussianAdaptiveAttention(8, 2).double()
    x2 = x.clone()
    x2[..., :4] += 1.0
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[..., 4:], y2[..., 4:])  # heads are independent
    with pytest.raises(ValueError, match="divisible"):
        gaussian_adaptive(_r(1, 4, 6), torch.zeros(4, 1), torch.ones(4, 1))
    xs = _r(1, 6, 8, seed=5).requires_grad_()
    torch.autograd.gradcheck(lambda x: m(x), (xs,), fast_mode=True)


# ---- RCMHA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_relative_attention_matches_reference(causal, dtype):
    H, D, P = 2, 8, 16
    ins = {"q": _r(2, 9, H, D), "k": _r(2, 9, H, D, seed=1), "v": _r(2, 9, H, 5, seed=2), "u": 0.5 * _r(H, D, seed=3),
           "rel_k": 0.5 * _r(2 * P, H, D, seed=4), "rel_b": _r(2 * P, H, seed=5)}
    compare_fn(lambda causal=causal, **a: relative_position_attention(**a, causal=causal),
               lambda causal=causal, **a: naive_relative_attention(**a, causal=causal), ins, dtype)


def test_rcmha_identities():
    torch.manual_seed(0)
    m = RCMHA(16, 4, max_rel=32, causal=True).double()
    x = _r(2, 10, 16)
    y = m(x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    torch.testing.assert_close(m(x2)[:, :6], y[:, :6])  # causal convs and attention: no future leak
    with torch.no_grad():
        for cv in m.convs:
            cv.weight.zero_()
            cv.weight[:, :, -1] = 1.0  # current-step tap only
            cv.bias.zero_()
    ref = _mha_ref(lambda t: torch.cat([m.wq(t), m.wk(t), m.wv(t)], -1), m.proj, x, 4, True)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="relative range"):
        m(_r(1, 40, 16))
    small = RCMHA(8, 2, max_rel=8, causal=True).double()
    with torch.no_grad():
        small.rel_k.normal_()
        small.rel_b.normal_()
    torch.autograd.gradcheck(lambda x: small(x), (_r(1, 5, 8).requires_grad_(),), fast_mode=True)


# ---- SHSA ----------------------------------------------------------------------------------

def test_single_head_matches_reference():
    torch.manual_seed(0)
    m = SingleHeadAttention(20, 6, qk_dim=4).double()
    x = _r(2, 3, 4, 20)
    x1 = m.norm(x[..., :6].permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, 12, 1, 6)
    q, k = m.qk(x1).chunk(2, -1)
    o, _ = naive_masked_attention(q, k, m.v(x1))
    ref = m.proj(torch.relu(torch.cat([o.view(2, 3, 4, 6), x[..., 6:]], -1)))
    torch.testing.assert_close(m(x), ref)
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(20))
        m.proj.bias.zero_()
    xp = x.abs()
    torch.testing.assert_close(m(xp)[..., 6:], xp[..., 6:])  # the pass-through channels
    torch.autograd.gradcheck(lambda x: m(x), (_r(1, 2, 2, 20).requires_grad_(),), fast_mode=True)
    with pytest.raises(ValueError, match="partial_dim"):
        SingleHeadAttention(8, 9)


def test_registered():
    names = {s.name for s in ak.list_mechanisms()}
    assert {"moh", "softplus_attention", "gaussian_adaptive", "rcmha", "single_head"} <= names
