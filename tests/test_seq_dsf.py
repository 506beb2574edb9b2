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
                                          ("recurrent", False), ("recurrent", True)])
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
