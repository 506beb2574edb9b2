"""Combiner-Fixed (arXiv 2107.05768): the op against its naive twin and the paper's identities."""

from __future__ import annotations

import pytest
import torch

from attnkit.kernels.flash import native_reason
from attnkit.mechanisms.seq_combiner import CombinerAttention
from attnkit.ops.sequence.combiner import combiner_attention, combiner_density, combiner_tile_list
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_sequence2 import naive_combiner
from tolerances import assert_close, compare_fn

needs_kernel = pytest.mark.skipif(native_reason(torch.zeros(1)) is not None, reason="compiled tile kernel unavailable")


class native_off:
    """``ATTNKIT_NATIVE=0`` for a block (the kernel's status is read per call)."""

    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("ATTNKIT_NATIVE", "0")

    def __exit__(self, *exc):
        self.mp.undo()


def _qkv(B=2, N=10, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for n in "qkv"}


@pytest.mark.parametrize("N,s", [(12, 4), (10, 4), (9, 3), (5, 8)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_naive(N, s, causal, dtype):
    kw = dict(segment=s, causal=causal)
    compare_fn(lambda **a: combiner_attention(**a, **kw), lambda **a: naive_combiner(**a, **kw),
               _qkv(N=N), dtype)


@pytest.mark.parametrize("N,s", [(12, 4), (64, 8), (40, 1), (6, 6), (5, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_merged_backend_matches_naive(N, s, causal):
    # the fused inference path (direct part + summary part merged by log-sum-exp, causal summaries in chunks)
    t = {n: x.float() for n, x in _qkv(B=2, N=N, H=3, D=8, seed=1).items()}
    with torch.no_grad():
        out = combiner_attention(t["q"], t["k"], t["v"], segment=s, causal=causal, backend="merged")
        auto = combiner_attention(t["q"], t["k"], t["v"], segment=s, causal=causal)
    ref = naive_combiner(*(x.double() for x in t.values()), segment=s, causal=causal)
    assert_close(out, ref.float(), torch.float32, "merged")
    assert_close(auto, ref.float(), torch.float32, "automatic")


def test_merged_backend_declines_what_it_cannot_do():
    from attnkit.ops.base import explain

    t = {n: x.float() for n, x in _qkv(N=10).items()}
    q = t["q"].clone().requires_grad_()
    with native_off():  # without the tile kernel, training takes the segmented path
        assert explain("combiner_attention", q, t["k"], t["v"], segment=4).splitlines()[-1].endswith("segmented")
    with torch.no_grad():  # a ragged last segment
        assert "multiple of the segment" in explain("combiner_attention", *(t[n] for n in "qkv"), segment=4)
    with pytest.raises(ValueError, match="merged"):
        combiner_attention(q, t["k"], t["v"], segment=4, backend="merged")


def _full(q, k, v, causal):
    N = q.shape[1]
    allowed = torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.ones(N, N, dtype=torch.bool)
    return naive_masked_attention(q, k, v, allowed)[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [1, 11])
def test_one_span_or_one_token_segments_equal_full_attention(causal, s):
    t = _qkv(N=11)
    for backend in ("merged", "segmented", "reference"):
        if backend == "merged":  # float32 inference only
            with torch.no_grad():
                out = combiner_attention(*(t[n].float() for n in "qkv"), segment=s, causal=causal, backend=backend)
            assert_close(out, _full(t["q"], t["k"], t["v"], causal).float(), torch.float32, f"merged s={s}")
            continue
        out = combiner_attention(t["q"], t["k"], t["v"], segment=s, causal=causal, backend=backend)
        assert_close(out, _full(t["q"], t["k"], t["v"], causal), torch.float64, f"{backend} s={s}")


def test_segments_change_the_output_and_the_first_segment_is_exact():
    t = _qkv(N=12)
    out = combiner_attention(t["q"], t["k"], t["v"], segment=4, causal=True)
    full = _full(t["q"], t["k"], t["v"], True)
    assert_close(out[:, :4], full[:, :4], torch.float64, "first segment")
    assert (out[:, 4:] - full[:, 4:]).abs().max() > 1e-3  # summaries approximate the far span


def test_causal_output_ignores_the_future():
    t = _qkv(N=12)
    out = combiner_attention(t["q"], t["k"], t["v"], segment=4, causal=True)
    for name in "kv":
        t2 = dict(t)
        t2[name] = t[name].clone()
        t2[name][:, 7:] += 10
        out2 = combiner_attention(t2["q"], t2["k"], t2["v"], segment=4, causal=True)
        assert torch.equal(out[:, :7], out2[:, :7])


def test_every_key_gets_weight_through_summaries():
    # the gradient of one query's output reaches every key's value (full receptive field in one layer)
    t = _qkv(N=16)
    v = t["v"].clone().requires_grad_()
    combiner_attention(t["q"], t["k"], v, segment=4)[:, 0].sum().backward()
    assert (v.grad.abs().sum((0, 2, 3)) > 0).all()


def test_density_and_module():
    assert combiner_density(16384, 128) == pytest.approx((128 + 127 + 1) / 16384)
    m = CombinerAttention(16, 2, segment=4).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    assert m(x).shape == (1, 9, 16)
    with pytest.raises(ValueError, match="CombinerAttention"):
        CombinerAttention(16, 3)
    with pytest.raises(ValueError, match="combiner_attention: segment"):
        combiner_attention(x.view(1, 9, 2, 8), x.view(1, 9, 2, 8), x.view(1, 9, 2, 8), segment=0)


def test_check_finite_raises_on_the_merged_path():
    from attnkit._validate import check_finite

    t = {n: x.float() for n, x in _qkv(N=12).items()}
    t["k"][0, 3, 0, 1] = float("nan")
    with torch.no_grad(), check_finite(True), pytest.raises(ValueError, match="combiner_attention"):
        combiner_attention(t["q"], t["k"], t["v"], segment=4, backend="merged")
    with torch.no_grad():  # without the switch NaN propagates to the queries that depend on key 3
        out = combiner_attention(t["q"], t["k"], t["v"], segment=4, backend="merged")
    ref = naive_combiner(*(x.double() for x in t.values()), segment=4)
    assert torch.equal(out.isnan(), ref.isnan())


# ------------------------------------------------------------------ tiles backend (one tile-kernel call)


def _dense_pattern(N, s, causal):
    """Bool ``(N, N + n)``: which of ``[keys, summaries]`` each query may attend, from the paper's rule."""
    n = -(-N // s)
    i, j = torch.arange(N)[:, None], torch.arange(N + n)[None]
    a = i // s
    local = (j < N) & (j // s == a) & ((j <= i) if causal else True)
    r = j - N
    far = (j >= N) & ((r < a) if causal else (r != a))
    return local | far


def _tiles_dense(tl, N, nk):
    """Expand a tile list back into the bool ``(N, nk)`` pattern the kernel walks."""
    out = torch.zeros(tl.row_ptr.shape[-1] * tl.bq, -(-nk // tl.bk) * tl.bk, dtype=torch.bool)
    rp = tl.row_ptr[0, 0]
    for ti in range(rp.numel() - 1):
        for e in range(int(rp[ti]), int(rp[ti + 1])):
            tj, slot = int(tl.cols[e]), int(tl.slots[e])
            rows, cols = slice(ti * tl.bq, ti * tl.bq + tl.bq), slice(tj * tl.bk, tj * tl.bk + tl.bk)
            if slot < 0:
                out[rows, cols] = True
            else:
                words = tl.bits[0, 0, slot]  # (bq, words)
                bit = (words[:, :, None] >> torch.arange(64)) & 1  # (bq, words, 64)
                out[rows, cols] = bit.reshape(tl.bq, -1)[:, :tl.bk].bool()
    return out[:N, :nk]


@pytest.mark.parametrize("N,s", [(200, 16), (130, 1), (64, 64), (300, 7), (129, 128), (97, 200)])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_list_is_exactly_the_combiner_pattern(N, s, causal):
    # the tile kernel attends [keys, summaries] under this list: it must allow exactly the paper's pairs
    s_ = min(s, N)
    tl = combiner_tile_list(N, s_, causal)
    want = _dense_pattern(N, s_, causal)
    assert torch.equal(_tiles_dense(tl, N, want.shape[1]), want)
    assert tl.computed_pairs >= int(want.sum())


def _factorised(q, k, v, *, segment, causal, scale=None):
    """Combiner as ONE softmax over ``[keys, summaries]`` (the identity the tiles backend relies on), in torch."""
    N, D = q.shape[1], q.shape[-1]
    sc = D ** -0.5 if scale is None else scale
    qs = q * sc
    n = -(-N // segment)
    kR, vR = [], []
    for r in range(n):
        sl = slice(r * segment, min(N, (r + 1) * segment))
        w = torch.softmax(torch.einsum("bhd,bjhd->bhj", qs[:, sl].amax(1), k[:, sl]), -1)  # (B, H, s)
        kR.append(k[:, sl].amax(1))
        vR.append(torch.einsum("bhj,bjhd->bhd", w, v[:, sl]))
    keys, vals = torch.cat([k, torch.stack(kR, 1)], 1), torch.cat([v, torch.stack(vR, 1)], 1)  # (B, N + n, H, .)
    return naive_masked_attention(qs, keys, vals, _dense_pattern(N, segment, causal), scale=1.0)[0]


@pytest.mark.parametrize("N,s", [(37, 5), (16, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_one_softmax_over_keys_and_summaries_is_combiner(N, s, causal):
    # float64, torch only: no log-weight term is needed on the summary scores, so the kernel's single
    # online softmax over the concatenated keys computes the exact Combiner output (and gradients)
    compare_fn(lambda **a: _factorised(**a, segment=s, causal=causal),
               lambda **a: naive_combiner(**a, segment=s, causal=causal), _qkv(N=N, H=2, D=4), torch.float64)


@needs_kernel
@pytest.mark.parametrize("N,s", [(200, 16), (130, 1), (300, 7), (129, 128), (97, 200), (256, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_tiles_backend_matches_naive(N, s, causal):
    # output and every gradient in float32 against the float64 naive twin (ragged tails, s=1, s>N)
    kw = dict(segment=s, causal=causal)
    compare_fn(lambda **a: combiner_attention(**a, **kw, backend="tiles"), lambda **a: naive_combiner(**a, **kw),
               _qkv(B=2, N=N, H=2, D=16, seed=3), torch.float32)


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_tiles_identities_and_choice(causal):
    from attnkit.ops.base import explain

    t = {n: x.float() for n, x in _qkv(N=70, H=2, D=8).items()}
    full = _full(*(t[n].double() for n in "qkv"), causal).float()
    for s in (1, 70, 500):  # one-token segments and one span are full attention
        out = combiner_attention(t["q"], t["k"], t["v"], segment=s, causal=causal, backend="tiles")
        assert_close(out, full, torch.float32, f"tiles s={s}")
    q = t["q"].clone().requires_grad_()
    for args in ((q, t["k"], t["v"]), (t["q"], t["k"], t["v"])):  # training and inference pick it
        text = explain("combiner_attention", *args, segment=8, causal=causal)
        assert text.splitlines()[-1].endswith("tiles") and "fastest backend measured" in text
    assert "tiles" not in explain("combiner_attention", *(t[n].double() for n in "qkv"),
                                  segment=8).splitlines()[-1]  # float64 stays on exact torch ops
    with native_off():
        assert "ATTNKIT_NATIVE=0" in explain("combiner_attention", *(t[n] for n in "qkv"), segment=8)
        out = combiner_attention(*(t[n] for n in "qkv"), segment=8, causal=causal)  # falls back, same numbers
    assert_close(out, combiner_attention(*(t[n] for n in "qkv"), segment=8, causal=causal, backend="tiles"),
                 torch.float32, "fallback")


@needs_kernel
def test_tiles_nan_propagates_like_the_naive_twin():
    t = {n: x.float() for n, x in _qkv(N=12).items()}
    t["k"][0, 3, 0, 1] = float("nan")
    out = combiner_attention(t["q"], t["k"], t["v"], segment=4, backend="tiles")
    ref = naive_combiner(*(x.double() for x in t.values()), segment=4)
    assert torch.equal(out.isnan(), ref.isnan())


@needs_kernel
@pytest.mark.parametrize("poison", [None, ("q", 5, 1, 2), ("k", 9, 0, 3), ("v", 14, 1, 0), ("k", 2, 1, 1, "inf")])
def test_one_pass_summaries_equal_the_torch_form(poison):
    """Inference summaries from the compiled one-pass op (kernels/native/combiner_cpu.cpp) equal the torch form
    (max-pools, then one query's attention per segment): values to float32 rounding, and NaN exactly where
    the torch form has it (a NaN or inf in a segment's q, k or v)."""
    from attnkit.ops.sequence import combiner as C

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 16, 2, 16, generator=g) for _ in range(3))
    if poison is not None:
        bad = float(poison[4] if len(poison) > 4 else "nan")
        dict(q=q, k=k, v=v)[poison[0]][1, poison[1], poison[2], poison[3]] = bad
    c = C.make_call(q, k, v, segment=4)
    assert C._one_pass_summaries(c)
    _, _, kR, vR, _ = C._summaries(c)
    torch_kR = k.view(2, 4, 4, 2, 16).amax(2)
    qR = q.view(2, 4, 4, 2, 16).amax(2)
    logits = torch.einsum("bnhd,bnjhd->bnhj", qR * c.scale, k.view(2, 4, 4, 2, 16))
    torch_vR = torch.einsum("bnhj,bnjhd->bnhd", logits.softmax(-1), v.view(2, 4, 4, 2, 16))
    assert torch.equal(kR.isnan(), torch_kR.isnan()) and torch.equal(vR.isnan(), torch_vR.isnan())
    ok = ~torch_vR.isnan()
    assert torch.allclose(kR[~torch_kR.isnan()], torch_kR[~torch_kR.isnan()], atol=0, rtol=0)
    assert torch.allclose(vR[ok], torch_vR[ok], atol=1e-6, rtol=1e-5)
    if poison is not None:
        assert vR.isnan().any()  # the poison reached a summary
    qg = q.clone().requires_grad_()
    assert not C._one_pass_summaries(C.make_call(qg, k, v, segment=4))  # training takes the torch form
