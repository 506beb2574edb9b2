"""Titans' neural memory (arXiv 2501.00663): the chunked op against its naive twin (output, state and every
gradient), the paper's identities, and every variant of the module against its reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attnkit.mechanisms.seq_titans import TitansMemory
from attnkit.ops.memory.titans import titans_memory, titans_retrieve
from attnkit.reference.naive_sequence import naive_titans_memory, naive_titans_module
from tolerances import assert_close, compare_fn

B, N, H, D, E = 2, 11, 2, 4, 6


def _inputs(seed=0, depth=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (F.normalize(torch.randn(B, N, H, D, generator=g, dtype=dtype), dim=-1) for _ in range(3))
    alpha, eta, theta = (0.5 * torch.rand(B, N, H, generator=g, dtype=dtype) for _ in range(3))
    if depth == 1:
        ws = (0.3 * torch.randn(H, D, D, generator=g, dtype=dtype),)
    else:
        ws = (0.3 * torch.randn(H, D, E, generator=g, dtype=dtype),
              0.3 * torch.randn(H, E, D, generator=g, dtype=dtype))
    return dict(q=q, k=k, v=v, alpha=alpha, eta=eta, theta=theta, ws=ws)


def _flat(y, state):
    return (y, *state[0], *state[1])


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
def test_op_matches_naive_output_state_and_grads(depth, chunk, backend):
    x = _inputs(depth=depth)
    inputs = {n: t for n, t in x.items() if n != "ws"}
    inputs.update({f"w{i}": w for i, w in enumerate(x["ws"])})

    def fast(q, k, v, alpha, eta, theta, **w):
        return _flat(*titans_memory(q, k, v, alpha, eta, theta, tuple(w.values()), chunk_size=chunk,
                                    return_state=True, backend=backend))

    def ref(q, k, v, alpha, eta, theta, **w):
        return _flat(*naive_titans_memory(q, k, v, alpha, eta, theta, tuple(w.values()), chunk_size=chunk,
                                          return_state=True))

    compare_fn(fast, ref, inputs, torch.float64)
    compare_fn(fast, ref, inputs, torch.float32)


def test_zero_learning_rate_and_no_forgetting_keep_the_initial_memory():
    x = _inputs()
    zero = torch.zeros_like(x["alpha"])
    y, (ws, ms) = titans_memory(x["q"], x["k"], x["v"], zero, x["eta"], zero, x["ws"], chunk_size=4,
                                return_state=True)
    assert_close(y, titans_retrieve(x["q"], x["ws"]), torch.float64, "y = M_0(q)")
    for w, w0 in zip(ws, x["ws"]):
        assert torch.equal(w, w0.expand_as(w))
    assert all(torch.equal(m, torch.zeros_like(m)) for m in ms)


def test_module_with_inner_lr_zero_and_no_forgetting_reads_its_initial_memory():
    torch.manual_seed(0)
    m = TitansMemory(8, 2, variant="lmm", inner_lr=0.0, num_persistent=0).double()
    with torch.no_grad():
        m.gates.bias[:2].fill_(-1e4)  # alpha = sigmoid(-1e4) = 0: no forgetting
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    q = m._mem_inputs(x)[0]
    want = m.proj(titans_retrieve(q, tuple(m.memory)).reshape(1, 10, 8))
    assert_close(m(x), want, torch.float64, "M_0 read")


def test_full_forgetting_leaves_only_the_momentum():
    x = _inputs(depth=1)
    one = torch.ones_like(x["alpha"])
    _, (ws, ms) = titans_memory(x["q"], x["k"], x["v"], one, x["eta"], x["theta"], x["ws"], chunk_size=1,
                                return_state=True)
    assert_close(ws[0], ms[0], torch.float64, "M_t = S_t")


def test_linear_memory_without_momentum_or_forgetting_is_the_delta_rule():
    x = _inputs(depth=1)
    zero = torch.zeros_like(x["alpha"])
    y, (ws, _) = titans_memory(x["q"], x["k"], x["v"], zero, zero, x["theta"], x["ws"], chunk_size=1,
                               return_state=True)
    W = x["ws"][0].expand(B, H, D, D).clone()
    outs = []
    for t in range(N):
        kt, vt, qt = (z[:, t].unsqueeze(-2) for z in (x["k"], x["v"], x["q"]))  # (B, H, 1, D)
        W = W - 2 * x["theta"][:, t, :, None, None] * kt.transpose(-1, -2) @ (kt @ W - vt)
        outs.append((qt @ W).squeeze(-2))
    assert_close(ws[0], W, torch.float64, "W_N")
    assert_close(y, torch.stack(outs, 1), torch.float64, "y")


def test_no_momentum_is_online_gradient_descent_with_decay():
    x = _inputs(depth=1)
    zero = torch.zeros_like(x["alpha"])
    _, (ws, _) = titans_memory(x["q"], x["k"], x["v"], x["alpha"], zero, x["theta"], x["ws"], chunk_size=1,
                               return_state=True)
    W = x["ws"][0].expand(B, H, D, D).clone()
    for t in range(N):
        kt, vt = x["k"][:, t].unsqueeze(-2), x["v"][:, t].unsqueeze(-2)
        a, th = x["alpha"][:, t, :, None, None], x["theta"][:, t, :, None, None]
        W = (1 - a) * W - th * 2 * kt.transpose(-1, -2) @ (kt @ W - vt)
    assert_close(ws[0], W, torch.float64, "W_N")


def test_state_continues_across_calls():
    x = _inputs()
    y, st = titans_memory(x["q"], x["k"], x["v"], x["alpha"], x["eta"], x["theta"], x["ws"], chunk_size=4,
                          return_state=True)
    cut = 8  # a chunk boundary
    y1, st1 = titans_memory(*(x[n][:, :cut] for n in ("q", "k", "v", "alpha", "eta", "theta")), x["ws"],
                            chunk_size=4, return_state=True)
    y2, st2 = titans_memory(*(x[n][:, cut:] for n in ("q", "k", "v", "alpha", "eta", "theta")), st1[0],
                            momentum=st1[1], chunk_size=4, return_state=True)
    assert_close(torch.cat([y1, y2], 1), y, torch.float64, "y")
    for a, b in zip(st2[0] + st2[1], st[0] + st[1]):
        assert_close(a, b, torch.float64, "state")


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
@pytest.mark.parametrize("depth", [1, 2])
def test_module_variants_match_reference_and_are_causal(variant, depth):
    torch.manual_seed(depth)
    m = TitansMemory(8, 2, variant=variant, memory_depth=depth, chunk_size=3, segment_size=4, window=3,
                     num_persistent=2).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    ref = copy.deepcopy(m)
    xr = x.detach().clone().requires_grad_()
    y, yr = m(x), naive_titans_module(ref, xr)
    assert_close(y, yr, torch.float64, "out")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    grads_r = torch.autograd.grad(yr, [xr, *ref.parameters()], g, allow_unused=True)
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], grads, grads_r):
        assert_close(a, b if b is not None else torch.zeros_like(a), torch.float64, f"d{name}", grad=True)
    x2 = x.detach().clone()
    x2[:, 5:] = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close(m(x2)[:, :5], y.detach()[:, :5], torch.float64, "past outputs")


def test_bad_arguments_are_named():
    x = _inputs()
    with pytest.raises(ValueError, match="alpha"):
        titans_memory(x["q"], x["k"], x["v"], x["alpha"][:, :3], x["eta"], x["theta"], x["ws"])
    with pytest.raises(ValueError, match="weights"):
        titans_memory(x["q"], x["k"], x["v"], x["alpha"], x["eta"], x["theta"], (torch.zeros(H, D + 1, D),))
    with pytest.raises(ValueError, match="chunk_size"):
        titans_memory(x["q"], x["k"], x["v"], x["alpha"], x["eta"], x["theta"], x["ws"], chunk_size=0)


@pytest.mark.parametrize("theta_b,factor", [(0.5, 0.0), (0.25, 0.5), (2.0, -3.0)])
def test_chunk_step_on_a_repeated_key_scales_the_error_by_one_minus_two_b_theta(theta_b, factor):
    # linear memory, no momentum or forgetting, one unit key repeated: a chunk of b tokens sums b gradients
    # 2 k^T (k W - v) taken at its first state, so the read error k W - v is multiplied by 1 - 2 b theta per
    # chunk: theta = 1 / (2b) recalls v after one chunk, theta > 1 / b overshoots and grows (why the module's
    # default inner_lr keeps inner_lr * chunk_size <= 1)
    b, chunks = 8, 3
    n = b * chunks
    k = torch.zeros(1, n, 1, 4, dtype=torch.float64)
    k[..., 0] = 1.0
    v = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64).expand(1, n, 1, 4)
    zero = torch.zeros(1, n, 1, dtype=torch.float64)
    w0 = torch.zeros(1, 4, 4, dtype=torch.float64)
    y = titans_memory(k, k, v, zero, zero, zero + theta_b / b, (w0,), chunk_size=b)  # (1, n, 1, 4)
    err = y[0, b - 1::b, 0] - v[0, b - 1::b, 0]  # read error at each chunk's last token (its update included)
    for c in range(chunks):
        assert_close(err[c], -v[0, 0, 0] * factor ** (c + 1), torch.float64, f"chunk {c}")


def test_module_default_stays_finite_where_the_old_inner_lr_diverged():
    # the quality suite's setting: width 32, 4 heads, chunk 16, inputs of a few units of norm; the old
    # default inner_lr 0.5 gave inf/NaN memory reads here at initialisation
    for seed in range(2):
        torch.manual_seed(seed)
        m = TitansMemory(32, 4, variant="lmm")
        x = 3 * torch.randn(4, 128, 32)
        y = m(x)
        assert torch.isfinite(y).all()
        y.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
