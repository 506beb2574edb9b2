"""ak.attention: every backend x mask x dtype x head layout against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.ops.dense.blocked import blocked_attention
from attnkit.reference.naive_dense import naive_attention
from tolerances import DTYPES, assert_close, compare_fn

M = ak.masks

# (B, Nq, Nk, Hq, Hkv, D, Dv)
LAYOUTS = {
    "MHA": (2, 45, 45, 4, 4, 16, 16),
    "GQA": (1, 45, 45, 6, 2, 8, 12),
    "cross": (2, 19, 45, 4, 1, 16, 8),
}
MASKS = {
    "none": None,
    "causal": M.causal(),
    "sw_causal": M.causal() & M.sliding_window(9),
    "document": M.document([15, 6, 24]),
    "causal_document": M.causal() & M.document([15, 6, 24]),
    "global_sw": M.sliding_window(4) | M.global_tokens(3),
    "strided": M.strided(5),
    "empty_rows": ~M.chunked(45) | M.sliding_window(0, 0) & M.chunked(3),
    "random_tensor": torch.rand(45, 45, generator=torch.Generator().manual_seed(0)) > 0.7,
}
SELF_ONLY = {"document", "causal_document", "empty_rows", "random_tensor"}
BACKENDS = ("blocked", "sdpa", "reference")


def make_inputs(layout, seed=0):
    b, nq, nk, hq, hkv, d, dv = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(b, nq, hq, d, generator=g, dtype=torch.float64),
        "k": torch.randn(b, nk, hkv, d, generator=g, dtype=torch.float64),
        "v": torch.randn(b, nk, hkv, dv, generator=g, dtype=torch.float64),
    }


def reference(mask):
    def ref(q, k, v):
        allowed = None if mask is None else M.as_mask(mask).to_dense(q.shape[1], k.shape[1])
        return naive_attention(q, k, v, allowed)
    return ref


def cases():
    for backend in BACKENDS:
        for mname in MASKS:
            for layout in LAYOUTS:
                if layout == "cross" and mname in SELF_ONLY:
                    continue
                for dtype in DTYPES:
                    yield pytest.param(backend, mname, layout, dtype, id=f"{backend}-{mname}-{layout}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend, mname, layout, dtype", list(cases()))
def test_backend_matches_reference(backend, mname, layout, dtype):
    mask = MASKS[mname]

    def fast(q, k, v):
        return ak.attention(q, k, v, mask=mask, backend=backend)

    compare_fn(fast, reference(mask), make_inputs(layout), dtype)


@pytest.mark.parametrize("tiles", [(4, 4, 8), (7, 3, 5), (16, 16, 16)])
@pytest.mark.parametrize("mname", ["none", "causal", "global_sw", "strided", "empty_rows", "document"])
def test_blocked_small_tiles_multi_chunk(mname, tiles):
    """Tiny tiles force many chunks per row: online-softmax merging and gathered key chunks."""
    mask = MASKS[mname]
    m = None if mask is None else M.as_mask(mask)

    def fast(q, k, v):
        return blocked_attention(q, k, v, m, q.shape[-1] ** -0.5, tiles=tiles)

    def ref(q, k, v):
        allowed = None if m is None else m.to_dense(q.shape[1], k.shape[1])
        return naive_attention(q, k, v, allowed, return_lse=True)

    compare_fn(fast, ref, make_inputs("GQA"), torch.float64)


@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_return_lse(backend):
    x = make_inputs("GQA")
    mask = MASKS["sw_causal"]
    out, lse = ak.attention(x["q"], x["k"], x["v"], mask=mask, backend=backend, return_lse=True)
    ref_out, ref_lse = naive_attention(x["q"], x["k"], x["v"], mask.to_dense(45, 45), return_lse=True)
    assert lse.shape == (1, 45, 6)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(lse, ref_lse, torch.float64, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grads(backend):
    x = {n: t.float().requires_grad_() for n, t in make_inputs("MHA").items()}
    allowed = torch.ones(45, 45, dtype=torch.bool)
    allowed[[3, 20, 44]] = False
    out = ak.attention(x["q"], x["k"], x["v"], mask=allowed, backend=backend)
    assert torch.isfinite(out).all()
    assert out[:, [3, 20, 44]].abs().max() == 0
    out.sum().backward()
    for n, t in x.items():
        assert torch.isfinite(t.grad).all(), n
    assert x["q"].grad[:, [3, 20, 44]].abs().max() == 0
    if backend != "sdpa":
        _, lse = ak.attention(x["q"], x["k"], x["v"], mask=allowed, backend=backend, return_lse=True)
        assert torch.isneginf(lse[:, [3, 20, 44]]).all() and torch.isfinite(lse[:, :3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stable(backend):
    x = make_inputs("MHA")
    q = x["q"] * 60  # logits in the thousands: exp overflows without max-subtraction
    mask = MASKS["causal"]
    out = ak.attention(q.float(), x["k"].float(), x["v"].float(), mask=mask, backend=backend)
    ref = naive_attention(q, x["k"], x["v"], mask.to_dense(45, 45))
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, "out", factor=10)


@pytest.mark.parametrize("with_lse", [True, False], ids=["lse-matmul-bwd", "out-fused-bwd"])
@pytest.mark.parametrize("mname", ["none", "causal", "sw_causal", "empty_rows"])
def test_gradcheck_blocked_fp64(mname, with_lse):
    mask = MASKS[mname]
    m = None if mask is None else M.as_mask(mask)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 12, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 12, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 12, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    if m is not None and mname == "empty_rows":
        m = M.as_mask(mask.to_dense(45, 45)[:12, :12])

    def f(q, k, v):
        out, lse = blocked_attention(q, k, v, m, 0.5, tiles=(4, 3, 6))
        return (out, torch.where(torch.isfinite(lse), lse, 0.0)) if with_lse else out

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_scale_override():
    x = make_inputs("MHA")
    out = ak.attention(x["q"], x["k"], x["v"], scale=0.3, backend="blocked")
    assert_close(out, naive_attention(x["q"], x["k"], x["v"], scale=0.3), torch.float64, "out")


def test_auto_choice_and_explain():
    q = torch.randn(1, 2048, 2, 16)
    assert "-> sdpa" in ak.explain("attention", q, q, q)
    assert "-> sdpa" in ak.explain("attention", q, q, q, mask=M.causal())
    text = ak.explain("attention", q, q, q, mask=M.sliding_window(64))
    assert "-> blocked" in text and "passed over" in text and "flex" in text
    text = ak.explain("attention", q.requires_grad_(), q, q, mask=M.causal(), backend="flex")
    assert "no backward on CPU" in text


def test_forced_backend_refusals():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="log-sum-exp"):
        ak.attention(q, q, q, backend="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="float64"):
        ak.attention(q.double(), q.double(), q.double(), backend="flex")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*blocked"):
        ak.attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((torch.randn(8, 2, 4),) * 3, {}, ValueError, "rank 4"),
    ((torch.randn(1, 8, 2, 4), torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4)), {}, ValueError, "batch"),
    ((torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 5), torch.randn(1, 8, 2, 4)), {}, ValueError, "head dims"),
    ((torch.randn(1, 8, 3, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)), {}, ValueError, "multiple"),
    ((torch.randn(1, 8, 2, 4), torch.randn(1, 9, 2, 4), torch.randn(1, 8, 2, 4)), {}, ValueError, "k and v"),
    ((torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4).double(), torch.randn(1, 8, 2, 4)), {}, TypeError, "dtype"),
    ((torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4, device="meta"), torch.randn(1, 8, 2, 4)), {},
     ValueError, "device"),
    ((torch.ones(1, 8, 2, 4, dtype=torch.long),) * 3, {}, TypeError, "float"),
    (("q", "k", "v"), {}, TypeError, "Tensor"),
    ((torch.randn(1, 8, 2, 4),) * 3, {"mask": torch.ones(8, 9, dtype=torch.bool)}, ValueError, "broadcast"),
    ((torch.randn(1, 8, 2, 4),) * 3, {"mask": torch.ones(8, 8)}, TypeError, "bool"),
    ((torch.randn(1, 8, 2, 4),) * 3, {"mask": torch.ones(3, 2, 8, 8, dtype=torch.bool)}, ValueError, "broadcast"),
    ((torch.randn(1, 8, 2, 4),) * 3, {"mask": M.document([4, 5])}, ValueError, "sum of lengths"),
    ((torch.randn(1, 8, 2, 4),) * 3, {"mask": "causal"}, TypeError, "mask"),
    ((torch.randn(1, 8, 2, 4),) * 3, {"scale": float("nan")}, ValueError, "scale"),
    ((torch.randn(1, 8, 2, 4),) * 3, {"backend": 3}, TypeError, "backend"),
])
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        ak.attention(*args, **kwargs)


@pytest.mark.slow
def test_flex_forward_matches_reference():
    """torch.compile(flex_attention) forward for a partial-tile mask with GQA (compiles once, ~20 s)."""
    x = {n: t.float() for n, t in make_inputs("GQA").items()}
    mask = MASKS["global_sw"]
    out = ak.attention(x["q"], x["k"], x["v"], mask=mask, backend="flex")
    ref_out = naive_attention(x["q"].double(), x["k"].double(), x["v"].double(), mask.to_dense(45, 45))
    assert_close(out, ref_out, torch.float32, "out")
    with pytest.raises(ValueError, match="log-sum-exp"):
        ak.attention(x["q"], x["k"], x["v"], mask=mask, backend="flex", return_lse=True)


# ---- property-based ------------------------------------------------------------------------

_mask_choice = st.sampled_from([None, M.causal(), M.sliding_window(3), M.chunked(4), M.strided(3),
                                M.causal() & M.sliding_window(5), M.sliding_window(1) | M.global_tokens(2),
                                ~M.sliding_window(2)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), nq=st.integers(1, 33), nk=st.integers(1, 33), hkv=st.integers(1, 2),
       group=st.integers(1, 3), d=st.integers(1, 9), dv=st.integers(1, 9), mask=_mask_choice,
       bq=st.integers(1, 12), bk=st.integers(1, 12), max_keys=st.integers(1, 24), seed=st.integers(0, 99))
def test_blocked_random_shapes(b, nq, nk, hkv, group, d, dv, mask, bq, bk, max_keys, seed):
    inputs = make_inputs_shape(b, nq, nk, hkv * group, hkv, d, dv, seed)

    def fast(q, k, v):
        return blocked_attention(q, k, v, mask, d ** -0.5, tiles=(bq, bk, max_keys))

    def ref(q, k, v):
        allowed = None if mask is None else mask.to_dense(nq, nk)
        return naive_attention(q, k, v, allowed, return_lse=True)

    compare_fn(fast, ref, inputs, torch.float64)


def make_inputs_shape(b, nq, nk, hq, hkv, d, dv, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(b, nq, hq, d, generator=g, dtype=torch.float64),
        "k": torch.randn(b, nk, hkv, d, generator=g, dtype=torch.float64),
        "v": torch.randn(b, nk, hkv, dv, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mname", list(MASKS))
def test_blocked_inference_path(mname, dtype):
    """Without grad and lse the blocked backend runs fused SDPA per tile: same answers."""
    mask = MASKS[mname]
    for layout in ("GQA", "cross"):
        if layout == "cross" and mname in SELF_ONLY:
            continue
        x = make_inputs(layout)
        with torch.no_grad():
            out = ak.attention(*(t.to(dtype) for t in x.values()), mask=mask, backend="blocked")
        assert out.dtype == dtype
        assert_close(out, reference(mask)(**x), dtype, f"out[{layout}]")


def test_blocked_inference_head_dependent_mask():
    x = make_inputs("GQA")
    allowed = torch.rand(1, 6, 45, 45, generator=torch.Generator().manual_seed(5)) > 0.6
    allowed[0, 2, 7] = False  # one empty row in one head
    with torch.no_grad():
        out = ak.attention(x["q"], x["k"], x["v"], mask=allowed, backend="blocked")
    assert_close(out, naive_attention(x["q"], x["k"], x["v"], allowed), torch.float64, "out")
    assert out[0, 7, 2].abs().max() == 0


@pytest.mark.parametrize("backend", ["gather", "blocked", "sdpa", None])
def test_routed_block_sparse_layout(backend):
    """A per-(batch, head) layout, with a causal mask inside the blocks, through ak.attention."""
    x = make_inputs("GQA")                                               # Nq = Nk = 45, Hq = 6
    g = torch.Generator().manual_seed(2)
    lay = torch.rand(1, 6, 6, 6, generator=g) > 0.5
    lay |= torch.eye(6, dtype=torch.bool)                                # every query block sees its own
    mask = M.block_sparse(lay, 8) & M.causal()
    if backend is None:
        assert "-> gather" in ak.explain("attention", *x.values(), mask=mask)

    def fast(q, k, v):
        return ak.attention(q, k, v, mask=mask, backend=backend)

    compare_fn(fast, reference(mask), x, torch.float32)


@pytest.mark.parametrize("mname", ["none", "causal", "sw_causal", "global_sw", "strided", "doc300"])
def test_blocked_grouped_tiles(mname):
    """N = 600 gives several full 128-row tiles, batched into groups (padded widths masked), with
    and without grad; plus a tiny group budget that forces one tile per group."""
    mask = M.document([250, 50, 300]) if mname == "doc300" else MASKS[mname]
    x = make_inputs_shape(1, 600, 600, 4, 2, 8, 8, seed=3)

    def fast(q, k, v):
        return ak.attention(q, k, v, mask=mask, backend="blocked")

    compare_fn(fast, reference(mask), x, torch.float32)
    with torch.no_grad():
        out = fast(*(t.float() for t in x.values()))
    assert_close(out, reference(mask)(**x), torch.float32, "out (inference)")
    m = None if mask is None else M.as_mask(mask)
    small = blocked_attention(*x.values(), m, 8 ** -0.5, tiles=(64, 32, 4096))[0]
    assert_close(small, reference(mask)(**x), torch.float64, "out (small tiles)")


def test_combined_routed_mask_with_wrong_heads_raises():
    q = torch.randn(1, 32, 4, 8)
    mask = M.block_sparse(torch.ones(1, 3, 4, 4, dtype=torch.bool), 8) & M.causal()
    with pytest.raises(ValueError, match=r"batch/head dims \(1, 3\)"):
        ak.attention(q, q, q, mask=mask)


def test_blocked_refuses_non_cpu_tensors():
    """The tile plan lives on the CPU: blocked says so, and a sparse mask off the CPU goes to sdpa."""
    q = torch.randn(1, 2048, 2, 16, device="meta")
    text = ak.explain("attention", q, q, q, mask=M.sliding_window(64))
    assert "blocked    cannot run: needs CPU tensors, got meta" in text
    assert "-> sdpa" in text and "meta tensors: the blocked tile walk is CPU-only" in text
    with pytest.raises(ValueError, match=r"backend 'blocked' cannot run .*needs CPU tensors, got meta"):
        ak.attention(q, q, q, mask=M.sliding_window(64), backend="blocked")


def test_explain_shows_the_blocked_path(monkeypatch):
    """Without the compiled kernel (ATTNKIT_NATIVE=0) explain names the torch-ops path and its switches."""
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    q = torch.randn(1, 256, 2, 16)
    mask = M.sliding_window(16)
    text = ak.explain("attention", q, q, q, mask=mask, backend="blocked")
    assert "torch-ops path (native kernel disabled by ATTNKIT_NATIVE=0); inference (fused SDPA per tile)" in text
    text = ak.explain("attention", q, q, q, mask=mask, backend="blocked", return_lse=True)
    assert "training (online softmax + lse" in text and "the lse is asked" in text
    text = ak.explain("attention", q.requires_grad_(), q, q, mask=mask, backend="blocked")
    assert "training (online softmax + lse" in text and "an input needs a gradient" in text
    with torch.no_grad():
        assert "; inference" in ak.explain("attention", q, q, q, mask=mask, backend="blocked")
    half = ak.explain("attention", q.detach().bfloat16(), q.detach().bfloat16(), q.detach().bfloat16(),
                      mask=mask, backend="blocked", return_lse=True)
    assert "online softmax + lse in float32" in half


def test_no_backend_names_opt_in_ones():
    q = torch.randn(1, 256, 2, 16, device="meta")
    with pytest.raises(ValueError, match="flex: opt-in only"):
        ak.attention(q, q, q, mask=M.sliding_window(16), return_lse=True)
