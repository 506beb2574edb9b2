"""DSF (arXiv 2405.15731): every backend against the naive scan, and the families' forms agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.mechanisms.seq_dsf import DSFLayer
from attnkit.ops.linear.call import linear_attention
from attnkit.ops.sequence.dsf import (
    dsf_from_gated_rnn,
    dsf_from_linear_attention,
    dsf_from_s6,
    dsf_matrix,
    dsf_scan,
    run_dsf,
)
from attnkit.ops.sequence.dsf_chunk import dsf_two_level_scan, scan_chunk
from attnkit.reference.naive_sequence2 import (
    naive_causal_linear_attention,
    naive_dsf_scan,
    naive_gated_rnn,
    naive_selective_scan,
)
from tolerances import assert_close, compare_fn

B, N, H, n, d = 2, 11, 2, 3, 4


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _system(diag: bool, seed=0):
    g = _g(seed)
    shape = (B, N, H, n) if diag else (B, N, H)
    return {"decay": torch.rand(shape, generator=g, dtype=torch.float64) * 0.5 + 0.5,
            "b": torch.randn(B, N, H, n, generator=g, dtype=torch.float64),
            "c": torch.randn(B, N, H, n, generator=g, dtype=torch.float64),
            "u": torch.randn(B, N, H, d, generator=g, dtype=torch.float64),
            "norm": torch.rand(B, N, H, generator=g, dtype=torch.float64) + 1}


@pytest.mark.parametrize("backend,diag", [("linear_attention", False), ("chunked", False), ("chunked", True),
                                          ("recurrent", False), ("recurrent", True), ("scan", False),
                                          ("scan", True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backends_match_naive_scan(backend, diag, dtype):
    compare_fn(lambda **a: dsf_scan(**a, chunk=4, backend=backend), naive_dsf_scan, _system(diag), dtype)


@pytest.mark.parametrize("diag", [False, True])
def test_unrolled_matrix_form_equals_the_recurrence(diag):
    t = _system(diag)
    from attnkit.ops.sequence.dsf import DSF

    sys = DSF(**t)
    y = torch.einsum("bhij,bjhd->bihd", dsf_matrix(sys), t["u"])
    assert_close(y, naive_dsf_scan(**t), torch.float64, "Phi u")
    assert (dsf_matrix(sys).triu(1) == 0).all()  # causal


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_as_dsf_equals_linear_attention(normalize):
    g = _g(1)
    q, k = (torch.randn(B, N, H, n, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, N, H, d, generator=g, dtype=torch.float64)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    sys = dsf_from_linear_attention(q, k, v, feature_map=phi, normalize=normalize)
    native = naive_causal_linear_attention(phi(q), phi(k), v, normalize=normalize)
    kernel = linear_attention(q, k, v, causal=True, feature_map="elu1", normalize=normalize, scale=1.0)
    for backend in ("linear_attention", "chunked", "reference"):
        assert_close(run_dsf(sys, backend=backend), native, torch.float64, backend)
    assert_close(kernel, native, torch.float64, "ak.linear_attention")


def test_decayed_linear_attention_is_the_constant_decay_dsf():
    # DS3: Lambda = lambda I with lambda per head equals ak.linear_attention's decay
    g = _g(2)
    q, k = (torch.randn(B, N, H, n, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, N, H, d, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.9, 0.6], dtype=torch.float64)
    sys = dsf_from_linear_attention(q, k, v, decay=lam)
    assert_close(run_dsf(sys, backend="chunked"), linear_attention(q, k, v, decay=lam, scale=1.0, backend="reference"),
                 torch.float64, "DS3")


def test_s6_as_dsf_equals_the_selective_scan():
    g = _g(3)
    Ch = 5
    x, dt = torch.randn(B, N, Ch, generator=g, dtype=torch.float64), torch.rand(B, N, Ch, generator=g).double()
    A = -torch.rand(Ch, n, generator=g, dtype=torch.float64) * 2
    Bm, Cm = (torch.randn(B, N, n, generator=g, dtype=torch.float64) for _ in range(2))
    sys = dsf_from_s6(x, dt, A, Bm, Cm)
    native = naive_selective_scan(x, dt, A, Bm, Cm)
    for backend in ("recurrent", "chunked", "reference"):
        assert_close(run_dsf(sys, backend=backend).squeeze(-1), native, torch.float64, backend)


def test_gated_rnn_as_dsf_equals_the_rnn_loop():
    g = _g(4)
    x, f = torch.randn(B, N, 6, generator=g, dtype=torch.float64), torch.rand(B, N, 6, generator=g).double()
    sys = dsf_from_gated_rnn(x, f)
    for backend in ("linear_attention", "recurrent", "chunked", "reference"):
        assert_close(run_dsf(sys, backend=backend).squeeze(-1), naive_gated_rnn(x, f), torch.float64, backend)


def test_scalar_step_s6_is_normalised_attention_with_a_query_independent_normaliser():
    # DS2: w_j > 0, eta_i = sum_{j<=i} w_j, exp(-delta_i) = eta_{i-1} / eta_i, input scale 1 - exp(-delta_i)
    g = _g(5)
    w = torch.rand(B, N, H, generator=g, dtype=torch.float64) + 0.1
    bk, cq = (torch.randn(B, N, H, n, generator=g, dtype=torch.float64) for _ in range(2))
    u = torch.randn(B, N, H, d, generator=g, dtype=torch.float64)
    eta = w.cumsum(1)
    lam = torch.cat([torch.full_like(eta[:, :1], 0.5), eta[:, :-1] / eta[:, 1:]], 1)  # lambda_1 acts on h_0 = 0
    gain = torch.cat([torch.ones_like(lam[:, :1]), 1 - lam[:, 1:]], 1)  # w_j / eta_j (= 1 at step 1)
    y_ssm = dsf_scan(lam, gain.unsqueeze(-1) * bk, cq, u, backend="chunked")
    attn = torch.einsum("bihn,bjhn->bhij", cq, bk).tril() * w.transpose(1, 2).unsqueeze(2)  # (B, H, N, N)
    y_att = torch.einsum("bhij,bjhd->bihd", attn, u) / eta.unsqueeze(-1)
    assert_close(y_ssm, y_att, torch.float64, "DS2")


def test_per_channel_step_has_no_single_decay_backend():
    t = _system(True)
    with pytest.raises(ValueError, match="diagonal transition"):
        dsf_scan(t["decay"], t["b"], t["c"], t["u"], backend="linear_attention")
    with pytest.raises(ValueError, match="dsf_scan: c"):
        dsf_scan(t["decay"], t["b"], t["c"][..., :1], t["u"])


@pytest.mark.parametrize("form", ["linear_attention", "s6", "rnn"])
def test_module_forms_match_their_native_loops(form):
    from attnkit.reference.naive_sequence2 import naive_dsf_module

    m = DSFLayer(8, 2, form=form, state=3).double()
    x = torch.randn(2, 9, 8, generator=_g(6), dtype=torch.float64)
    assert_close(m(x), naive_dsf_module(m, x), torch.float64, form)


# ------------------------------------------------------------------ the two-level scan (dsf_chunk)


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 16, None])  # N = 11: 11 % 3, 11 % 4 != 0 (padded tail), 16 > N
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_level_scan_matches_naive_scan_at_every_chunking(chunk, diag, dtype):
    t = _system(diag, seed=7)
    del t["norm"]
    compare_fn(lambda **a: dsf_two_level_scan(**a, chunk=chunk), naive_dsf_scan, t, dtype)


@pytest.mark.parametrize("chunk", [5, 8, None])
@pytest.mark.parametrize("regime", ["near0", "near1", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_level_scan_with_extreme_decays(chunk, regime, dtype):
    # S6 shape (d = 1); decays exactly 0 (a reset), tiny (exp(delta A) with delta A ~ -60) and 1 or 1 - 1e-7
    g = _g(8)
    Bt, Nt, Ht, nt = 2, 37, 3, 4
    r = torch.rand(Bt, Nt, Ht, nt, generator=g, dtype=torch.float64)
    lam = {"near0": torch.exp(-60 * r) * (r > 0.2), "near1": 1 - 1e-7 * r * (r > 0.3),
           "mixed": torch.where(r > 0.5, 1 - 1e-7 * r, torch.exp(-40 * r))}[regime]
    t = {"decay": lam, "b": torch.randn(Bt, Nt, Ht, nt, generator=g, dtype=torch.float64),
         "c": torch.randn(Bt, Nt, Ht, nt, generator=g, dtype=torch.float64),
         "u": torch.randn(Bt, Nt, Ht, 1, generator=g, dtype=torch.float64)}
    compare_fn(lambda **a: dsf_two_level_scan(**a, chunk=chunk), naive_dsf_scan, t, dtype)
    y = dsf_two_level_scan(**{k: v.to(dtype) for k, v in t.items()}, chunk=chunk)
    assert torch.isfinite(y).all()


def test_two_level_scan_gradcheck_across_chunks():
    t = _system(True, seed=9)
    args = tuple(t[k].requires_grad_() for k in ("decay", "b", "c", "u"))
    assert torch.autograd.gradcheck(lambda *a: dsf_two_level_scan(*a, chunk=3), args)
    s = _system(False, seed=9)
    args = tuple(s[k].requires_grad_() for k in ("decay", "b", "c", "u"))
    assert torch.autograd.gradcheck(lambda *a: dsf_two_level_scan(*a, chunk=4), args)


@pytest.mark.parametrize("chunk", [4, None])
@pytest.mark.parametrize("where", ["u", "decay", "b"])
def test_scan_nan_reaches_exactly_the_later_outputs(where, chunk):
    # a NaN at step 5 of head 1 reaches that head's outputs from step 5 on, as in the step loops
    t = _system(True, seed=10)
    del t["norm"]
    t[where][0, 5, 1].fill_(float("nan"))
    ref = naive_dsf_scan(**t)
    for y in (dsf_two_level_scan(**t, chunk=chunk), dsf_scan(**t, backend="recurrent")):
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
    bad = torch.isnan(ref)
    assert bad[0, 5:, 1].all() and not bad[0, :5].any() and not bad[1].any() and not bad[:, :, 0].any()


def test_auto_dispatch_picks_the_scan_for_narrow_values_and_explains():
    from attnkit.ops.base import explain

    g = _g(11)
    lam = torch.rand(1, 16, 4, 3, generator=g)
    b, c = torch.randn(2, 1, 16, 4, 3, generator=g)
    u1, u16 = torch.randn(1, 16, 4, 1, generator=g), torch.randn(1, 16, 4, 16, generator=g)
    text = explain("dsf_scan", lam, b, c, u=u1)
    assert "-> scan" in text and "one autograd node" in text and "chosen: scan" in text
    assert "recurrent" in text and "passed over" in text
    assert "chosen: chunked" in explain("dsf_scan", lam, b, c, u=u16)  # d = 16 > 64 / 8
    assert_close(dsf_scan(lam, b, c, u1).double(), naive_dsf_scan(lam, b, c, u1).double(), torch.float32, "auto")


def test_scan_chunk_policy():
    assert scan_chunk(1024) == 1024 and scan_chunk(7) == 7  # CPU: one chunk
    assert scan_chunk(1024, "cuda") == 32 and scan_chunk(64, "cuda") == 8 and scan_chunk(7, "cuda") == 3
    assert scan_chunk(1000, "cuda") == 32 or 1000 % scan_chunk(1000, "cuda") == 0


def test_s6_module_trains_through_the_scan_with_the_loops_gradients():
    m = DSFLayer(6, 2, form="s6", state=4).double()
    x = torch.randn(2, 21, 6, generator=_g(12), dtype=torch.float64, requires_grad=True)
    from attnkit.reference.naive_sequence2 import naive_dsf_module

    y, y_ref = m(x), naive_dsf_module(m, x)
    assert_close(y, y_ref, torch.float64, "s6 forward")
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *m.parameters()])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x, *m.parameters()])
    for a, r in zip(grads, grads_ref, strict=True):
        assert_close(a, r, torch.float64, "s6 gradient")
