"""ak.linear_attention: every backend against the fp64 naive oracles, outputs, states and every gradient.

Oracles: reference/naive_linear.py (materialised weights; and an explicit per-token loop).
Identities of arXiv 2006.16236 (L*) and 2401.04658 (LA*), and the state hand-off of ``docs/design.md`` §3.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.reference.naive_linear import naive_linear_attention, naive_recurrent_linear_attention
from tolerances import DTYPES, TOL, assert_close, compare_fn

B, H = 2, 4


def _inputs(N, Hkv=H, D=8, Dv=6, decay="head", state=True, normalize=False, M=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    d = {
        "q": torch.randn(B, N, H, D, generator=g, dtype=torch.float64),
        "k": torch.randn(B, M, Hkv, D, generator=g, dtype=torch.float64),
        "v": torch.randn(B, M, Hkv, Dv, generator=g, dtype=torch.float64),
    }
    if decay == "head":  # different decay per head, some strong
        d["decay"] = torch.tensor([0.5, 0.8, 0.95, 0.999], dtype=torch.float64)
    elif decay == "token":
        d["decay"] = torch.rand(B, N, H, generator=g, dtype=torch.float64) * 0.5 + 0.5
    if state:
        d["S0"] = torch.randn(B, H, D, Dv, generator=g, dtype=torch.float64) * 0.5
        if normalize:
            d["z0"] = torch.rand(B, H, D, generator=g, dtype=torch.float64)
    return d


def _fn(backend, normalize=False, feature_map="identity", causal=True, chunk_size=None, return_state=True):
    """(inputs dict) -> (o, S) or (o, S, z), states cast to o's dtype so compare_fn checks them like outputs."""

    def run(q, k, v, decay=None, S0=None, z0=None):
        st = None if S0 is None else ((S0, z0) if normalize else S0)
        kw = dict(causal=causal, feature_map=feature_map, decay=decay, normalize=normalize, initial_state=st,
                  return_state=return_state)
        if backend == "oracle":
            res = naive_linear_attention(q, k, v, **kw)
        else:
            res = ak.linear_attention(q, k, v, backend=backend, chunk_size=chunk_size, **kw)
        if not return_state:
            return res
        o, S = res
        return (o, S[0].to(o.dtype), S[1].to(o.dtype)) if normalize else (o, S.to(o.dtype))

    return run


@pytest.mark.parametrize("N", [1, 13, 77])
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@pytest.mark.parametrize("Hkv", [H, 2])
def test_matches_oracle_fp32(N, decay, backend, Hkv, chunk_kernel):
    """Output, final state, dq/dk/dv/dS0/ddecay vs the fp64 oracle; multiple chunks (C=16), GQA."""
    if backend == "recurrent" and (chunk_kernel != "native" or (N == 77 and Hkv == 2)):
        pytest.skip("covered by the other recurrent cases")
    inputs = _inputs(N, Hkv=Hkv, decay=decay)
    compare_fn(_fn(backend, chunk_size=16), _fn("oracle"), inputs, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", ["none", "head", "token"])
def test_dtypes_chunk(dtype, decay, chunk_kernel):
    inputs = _inputs(70, Hkv=2, decay=decay)
    names = ("q", "k", "v", "S0") + (("decay",) if decay != "none" and dtype in (torch.float64, torch.float32) else ())
    compare_fn(_fn("chunk", chunk_size=32), _fn("oracle"), inputs, dtype, grad_names=names)


@pytest.mark.parametrize("fm,normalize", [("identity", False), ("elu+1", True), ("relu", True), ("softmax", True),
                                          ("elu1", False), ("callable", False)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("decay", ["none", "token"])
def test_feature_maps_normalize(fm, normalize, causal, decay):
    if not causal and decay != "none":
        pytest.skip("decay is causal only")
    if fm == "callable":
        def fm(x):  # width-changing map: [x, x^2 / 2]
            return torch.cat([x, 0.5 * x * x], dim=-1)
        inputs = _inputs(40, Hkv=2, decay=decay, state=False)
    else:
        inputs = _inputs(40, Hkv=2, decay=decay, normalize=normalize)
    compare_fn(_fn("chunk", normalize, fm, causal, chunk_size=16), _fn("oracle", normalize, fm, causal),
               inputs, torch.float32)


def test_noncausal_cross_attention():
    """NC: Nq != Nk, GQA; L2 associativity is the oracle comparison itself."""
    inputs = _inputs(9, Hkv=2, decay="none", M=23)
    compare_fn(_fn("chunk", causal=False), _fn("oracle", causal=False), inputs, torch.float32)


def test_two_oracles_agree():
    """Materialised weights == explicit recurrence (the spec is consistent with itself)."""
    d = _inputs(21, Hkv=2, decay="token", normalize=True)
    for norm, fm in ((False, "identity"), (True, "elu+1")):
        st = (d["S0"], d["z0"]) if norm else d["S0"]
        a, Sa = naive_linear_attention(d["q"], d["k"], d["v"], decay=d["decay"], normalize=norm, feature_map=fm,
                                       initial_state=st, return_state=True)
        b, Sb = naive_recurrent_linear_attention(d["q"], d["k"], d["v"], decay=d["decay"], normalize=norm,
                                                 feature_map=fm, initial_state=st, return_state=True)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(Sa, Sb)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 37])
def test_chunk_sizes(chunk_size, chunk_kernel):
    """TN1/LA1: any chunk size, ragged last chunk, one chunk (C = N = 37)."""
    inputs = _inputs(37, decay="head")
    compare_fn(_fn("chunk", chunk_size=chunk_size), _fn("oracle"), inputs, torch.float64)


def test_long_sequence_multiple_segments(chunk_kernel):
    """N spans several segments of the chunk core (segment state hand-off, fwd and bwd)."""
    from attnkit.ops.linear.chunk import chunk_linear_attention

    d = _inputs(300, Hkv=2, decay="token", state=True)
    q, k, v, g = d["q"], d["k"], d["v"], torch.log(d["decay"])

    def fast(q, k, v, g, S0):
        return chunk_linear_attention(q, k, v, g, S0, scale=0.3, chunk_size=16, segment=64)

    def ref(q, k, v, g, S0):
        return naive_linear_attention(q, k, v, decay=g.exp(), scale=0.3, initial_state=S0, return_state=True)

    compare_fn(fast, ref, {"q": q, "k": k, "v": v, "g": g, "S0": d["S0"]}, torch.float64)


@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("normalize", [False, True])
def test_prefill_then_decode_equals_full(decay, normalize, chunk_kernel):
    """LA4 / §0.6: chunked prefill (return_state) + token-by-token recurrent decode == one call."""
    d = _inputs(45, Hkv=2, decay=decay, state=False)
    q, k, v = (d[n].float() for n in "qkv")
    dec = d.get("decay")
    fm = "elu+1" if normalize else "identity"
    full = ak.linear_attention(q, k, v, decay=dec, normalize=normalize, feature_map=fm)
    n1 = 33
    pre = None if dec is None else (dec if dec.dim() == 1 else dec[:, :n1])
    o1, st = ak.linear_attention(q[:, :n1], k[:, :n1], v[:, :n1], decay=pre, normalize=normalize,
                                 feature_map=fm, return_state=True, backend="chunk", chunk_size=16)
    outs = [o1]
    for t in range(n1, 45):
        dt = None if dec is None else (dec if dec.dim() == 1 else dec[:, t:t + 1])
        call = dict(decay=dt, normalize=normalize, feature_map=fm, initial_state=st, return_state=True)
        assert "-> recurrent" in ak.explain("linear_attention", q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], **call)
        o_t, st = ak.linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], **call)
        outs.append(o_t)
    assert_close(torch.cat(outs, dim=1), full, torch.float32, "decode")


def test_state_handoff_chunk_to_chunk():
    d = _inputs(90, decay="token", state=False)
    q, k, v, dec = (d[n].float() for n in ("q", "k", "v", "decay"))
    o, S = ak.linear_attention(q, k, v, decay=dec, return_state=True)
    a, Sa = ak.linear_attention(q[:, :50], k[:, :50], v[:, :50], decay=dec[:, :50], return_state=True)
    b, Sb = ak.linear_attention(q[:, 50:], k[:, 50:], v[:, 50:], decay=dec[:, 50:], initial_state=Sa,
                                return_state=True)
    assert_close(torch.cat([a, b], 1), o, torch.float32, "o")
    assert_close(Sb, S, torch.float32, "S")


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
def test_no_causality_leak(backend, chunk_kernel):
    """Changing tokens after t changes no output at or before t, and no gradient flows backwards in time."""
    if backend == "recurrent" and chunk_kernel != "native":
        pytest.skip("the chunk kernel choice does not touch the recurrent backend")
    d = _inputs(50, decay="token", state=False)
    q, k, v, dec = (d[n].float() for n in ("q", "k", "v", "decay"))
    t = 29
    o = ak.linear_attention(q, k, v, decay=dec, backend=backend, chunk_size=16)
    k2, v2, q2, dec2 = k.clone(), v.clone(), q.clone(), dec.clone()
    k2[:, t + 1:] += 5
    v2[:, t + 1:] -= 3
    q2[:, t + 1:] *= 2
    dec2[:, t + 1:] = 0.3
    o2 = ak.linear_attention(q2, k2, v2, decay=dec2, backend=backend, chunk_size=16)
    assert torch.equal(o[:, : t + 1], o2[:, : t + 1])
    assert not torch.allclose(o[:, t + 1:], o2[:, t + 1:])
    kk = k.clone().requires_grad_()
    ak.linear_attention(q, kk, v, decay=dec, backend=backend, chunk_size=16)[:, :t + 1].sum().backward()
    assert kk.grad[:, t + 1:].abs().max() == 0 and kk.grad[:, : t + 1].abs().max() > 0


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
def test_gradcheck_fp64(backend, chunk_kernel):
    """L7 / LA5: torch.autograd.gradcheck through q, k, v, initial state and per-token decay."""
    if backend == "recurrent" and chunk_kernel != "native":
        pytest.skip("the chunk kernel choice does not touch the recurrent backend")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 11, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    S0 = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    dec = (torch.rand(1, 11, 2, generator=g, dtype=torch.float64) * 0.5 + 0.4).requires_grad_()

    def f(q, k, v, S0, dec):
        o, S = ak.linear_attention(q, k, v, decay=dec, initial_state=S0, return_state=True, backend=backend,
                                   chunk_size=4)
        return o, S

    assert torch.autograd.gradcheck(f, (q, k, v, S0, dec), fast_mode=True)
    head = torch.tensor([0.7, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, lam: f(q, k, v, S0.detach(), lam), (q, k, v, head),
                                    fast_mode=True)


def test_identities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 20, 4, 8, dtype=torch.float64) for _ in range(3))
    # LA2: decay 1 == no decay
    a = ak.linear_attention(q, k, v, decay=torch.ones(4, dtype=torch.float64))
    assert_close(a, ak.linear_attention(q, k, v), torch.float64, "LA2")
    # L4: normalized, phi > 0, V = 1 => o = 1 (row-stochastic weights)
    o = ak.linear_attention(q, k, torch.ones_like(v), feature_map="elu+1", normalize=True, eps=0.0)
    assert_close(o, torch.ones_like(o), torch.float64, "L4")
    # L5: causal normalized N = 1 => o = v
    o = ak.linear_attention(q[:, :1], k[:, :1], v[:, :1], feature_map="elu+1", normalize=True, eps=0.0)
    assert_close(o, v[:, :1], torch.float64, "L5")
    # L8: unnormalized score is a sum over D: split D and add
    lam = torch.tensor([0.5, 0.7, 0.9, 1.0], dtype=torch.float64)
    full = ak.linear_attention(q, k, v, decay=lam, scale=1.0)
    split = sum(ak.linear_attention(q[..., s], k[..., s], v, decay=lam, scale=1.0)
                for s in (slice(0, 3), slice(3, 8)))
    assert_close(split, full, torch.float64, "L8")
    # L9: non-causal permutation invariance of keys/values
    p = torch.randperm(20)
    a = ak.linear_attention(q, k, v, causal=False, feature_map="elu+1", normalize=True)
    b = ak.linear_attention(q, k[:, p], v[:, p], causal=False, feature_map="elu+1", normalize=True)
    assert_close(b, a, torch.float64, "L9")


def test_relu_zero_rows_and_extreme_decay():
    """L6: ReLU row of zeros -> 0 output, finite grads; LA6: s=50 -> o_t = scale (q_t.k_t) v_t; s=1e-6 ~ none."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 70, 2, 8) for _ in range(3))
    q[:, 5] = -q[:, 5].abs()
    qq = q.clone().requires_grad_()
    o = ak.linear_attention(qq, k, v, feature_map="relu", normalize=True)
    assert torch.equal(o[:, 5], torch.zeros_like(o[:, 5]))
    o.sum().backward()
    assert torch.isfinite(qq.grad).all()
    lam = torch.exp(-torch.tensor([50.0, 50.0]))
    o = ak.linear_attention(q, k, v, decay=lam, chunk_size=64, scale=1.0)
    expect = (q * k).sum(-1, keepdim=True) * v
    assert torch.isfinite(o).all()
    assert_close(o, expect, torch.float32, "LA6 strong")
    o = ak.linear_attention(q, k, v, decay=torch.exp(-torch.tensor([1e-6, 1e-6])))
    assert_close(o, ak.linear_attention(q, k, v), torch.float32, "LA6 weak", factor=10)


def test_minimax_strong_decay_long_chunk_fp32():
    """MiniMax head 0 (s = 0.917) with C = 256: lambda^-C would overflow fp32; the log-space tiles do not."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 300, 2, 8, dtype=torch.float64) for _ in range(3))
    lam = torch.exp(-torch.tensor([0.917, 0.01], dtype=torch.float64))
    ref = naive_linear_attention(q, k, v, decay=lam)
    o = ak.linear_attention(q.float(), k.float(), v.float(), decay=lam.float(), chunk_size=256)
    assert torch.isfinite(o).all()
    assert_close(o, ref, torch.float32, "o")


def test_backend_choice_and_explain():
    q = k = v = torch.randn(1, 100, 2, 8)
    text = ak.explain("linear_attention", q, k, v, decay=torch.full((2,), 0.9))
    assert "-> chunk" in text and "reference" in text and "naive" not in text
    assert "-> recurrent" in ak.explain("linear_attention", q[:, :1], k[:, :1], v[:, :1])
    assert "recurrent  cannot run" in ak.explain("linear_attention", q, k, v, causal=False)
    with pytest.raises(ValueError, match="non-causal"):
        ak.linear_attention(q, k, v, causal=False, backend="recurrent")
    o = ak.linear_attention(q, k, v, backend="reference")
    assert_close(o, ak.linear_attention(q, k, v), torch.float32, "reference backend")
    with pytest.raises(ValueError, match="unknown backend 'naive'"):
        ak.linear_attention(q, k, v, backend="naive")  # one vocabulary: no alias


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(decay=torch.ones(3)), ValueError, "decay must have shape"),
    (dict(decay=torch.full((2,), 1.5)), ValueError, "in \\(0, 1\\]"),
    (dict(decay=torch.zeros(2)), ValueError, "in \\(0, 1\\]"),
    (dict(decay="x"), TypeError, "decay"),
    (dict(decay=torch.full((2,), 0.5), causal=False), ValueError, "decay requires causal"),
    (dict(feature_map="gelu"), ValueError, "unknown feature_map"),
    (dict(initial_state=torch.zeros(1, 2, 8, 7)), ValueError, "initial_state S"),
    (dict(initial_state=torch.zeros(1, 2, 8, 8), normalize=True), TypeError, "pair"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(backend="flash"), ValueError, "unknown backend"),
])
def test_bad_arguments(kwargs, err, match):
    q = k = v = torch.randn(1, 10, 2, 8)
    with pytest.raises(err, match=match):
        ak.linear_attention(q, k, v, **kwargs)


def test_causal_needs_aligned_lengths():
    q = torch.randn(1, 10, 2, 8)
    kv = torch.randn(1, 12, 2, 8)
    with pytest.raises(ValueError, match="aligned"):
        ak.linear_attention(q, kv, kv)
    assert ak.linear_attention(q, kv, kv, causal=False).shape == (1, 10, 2, 8)


def test_state_is_fp32_for_half_inputs():
    q = k = v = torch.randn(1, 20, 2, 8, dtype=torch.bfloat16)
    o, S = ak.linear_attention(q, k, v, return_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert TOL[torch.bfloat16].rrmse > 0  # table is shared; nothing local


def test_callable_feature_map_state_width_is_checked():
    """A callable phi may change the width; the state's Dphi is checked against phi's output."""
    q = k = v = torch.randn(1, 10, 2, 8)

    def square(x):
        return torch.cat([x, x * x], dim=-1)  # Dphi = 2 D

    _, S = ak.linear_attention(q, k, v, feature_map=square, return_state=True)
    assert S.shape == (1, 2, 16, 8)
    ak.linear_attention(q, k, v, feature_map=square, initial_state=S)
    with pytest.raises(ValueError, match="initial_state S must have Dphi = 16"):
        ak.linear_attention(q, k, v, feature_map=square, initial_state=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="initial_state z must have Dphi = 16"):
        ak.linear_attention(q, k, v, feature_map=lambda x: square(x).exp(), normalize=True,
                            initial_state=(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 8)))


def test_non_cpu_inputs_are_refused_by_the_causal_kernels():
    q = torch.randn(1, 100, 2, 8, device="meta")
    text = ak.explain("linear_attention", q, q, q)
    assert "recurrent  cannot run: needs CPU tensors, got meta" in text
    assert "chunk      cannot run: needs CPU tensors, got meta" in text
    for backend in ("chunk", "recurrent"):
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot run .*needs CPU tensors, got meta"):
            ak.linear_attention(q, q, q, backend=backend)
    # non-causal chunk is two einsums: any device
    assert "-> chunk" in ak.explain("linear_attention", q, q, q, causal=False)


def test_explain_shows_the_grad_path():
    q = torch.randn(1, 100, 2, 8)
    assert "path: forward only: no input needs a gradient" in ak.explain("linear_attention", q, q, q)
    text = ak.explain("linear_attention", q.requires_grad_(), q, q)
    assert "path: forward + hand-written chunked backward" in text
    with torch.no_grad():
        assert "path: forward only" in ak.explain("linear_attention", q, q, q)
    text = ak.explain("linear_attention", q[:, :4], q[:, :4], q[:, :4])
    assert "-> recurrent" in text and "path: autograd through the token loop" in text
