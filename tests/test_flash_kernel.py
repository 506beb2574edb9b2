"""The compiled tile kernel (kernels/flash.py over kernels/native/flash_tiles_cpu.cpp) under the blocked backend.

FlashAttention-2 (arXiv 2307.08691) restricted to a mask's non-empty tiles: output, lse and every gradient
(with and without a gradient flowing into the lse) against the float64 reference, for every mask of the
zoo, GQA, Dv != D, Nq != Nk, sizes that are not multiples of the tile, empty rows and empty query tiles,
head-dependent masks, non-contiguous inputs, bf16 / fp16, and the backward's determinism.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
import attnkit.masks as M
from attnkit.kernels import flash
from attnkit.kernels import native as _native
from attnkit.reference.naive_dense import naive_attention
from conftest import requires_native_kernel
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _native_kernel():
    requires_native_kernel()


def _inputs(b, nq, nk, hq, hkv, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, hq, d, generator=g)
    k = torch.randn(b, nk, hkv, d, generator=g)
    v = torch.randn(b, nk, hkv, dv, generator=g)
    return [t.to(dtype) for t in (q, k, v)]


def _check(q, k, v, mask, *, scale=None, lse_grad=True, factor=1.0):
    """Kernel (through ak.attention, backend='blocked') vs the float64 reference: out, lse, dq, dk, dv."""
    dtype = q.dtype
    nq, nk = q.shape[1], k.shape[1]
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = ak.attention(qs, ks, vs, mask, scale=scale, backend="blocked", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(out.shape, generator=gen)
    dl = torch.randn(lse.shape, generator=gen) if lse_grad else torch.zeros(lse.shape)
    fin = torch.isfinite(lse)
    (out.float() * do).sum().add_((lse.where(fin, 0.0) * dl).sum()).backward()

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    allowed = None if mask is None else M.as_mask(mask).to_dense(nq, nk)
    ro, rl = naive_attention(qr, kr, vr, allowed, scale=scale, return_lse=True)
    assert torch.equal(fin, torch.isfinite(rl)), "empty rows differ"
    (ro * do.double()).sum().add_((rl.where(fin, 0.0) * dl.double()).sum()).backward()
    assert_close(out, ro, dtype, "out", factor=factor)
    assert_close(lse.where(fin, 0.0), rl.where(fin, 0.0), dtype, "lse", factor=factor)
    for name, a, r in (("dq", qs, qr), ("dk", ks, kr), ("dv", vs, vr)):
        assert a.grad.dtype == dtype
        assert_close(a.grad, r.grad, dtype, name, grad=True, factor=factor)
    return out, lse, qs.grad


@pytest.mark.parametrize("name", list(M.ZOO))
def test_every_zoo_mask_fp32(name):
    """Every mask of the zoo at N=200 (not a multiple of the 64-token tiles), GQA 4:2, Dv != D."""
    n = 200
    q, k, v = _inputs(2, n, n, 4, 2, 16, 24)
    _check(q, k, v, M.zoo(name, n))


@pytest.mark.parametrize("name", ["causal", "sliding_window", "causal_document", "strided", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(name, dtype):
    """bf16 / fp16 inputs, computed in float32 tile by tile; output and gradients in the input dtype."""
    n = 160
    q, k, v = _inputs(1, n, n, 4, 1, 32, 32, dtype=dtype)
    _check(q, k, v, M.zoo(name, n))


@pytest.mark.parametrize("mask", [M.causal(offset=90), M.sliding_window(40), None, M.causal(offset=90)
                                  & M.sliding_window(17, offset=90)], ids=["causal_offset", "window", "full", "both"])
def test_cross_lengths(mask):
    """Nq != Nk (130 queries, 221 keys), MQA 8:1, D = 8, Dv = 40."""
    q, k, v = _inputs(1, 130, 221, 8, 1, 8, 40)
    _check(q, k, v, mask, scale=0.7)


def test_fully_masked_rows_and_tiles():
    """Rows with no allowed key give zeros, lse -inf and zero dq; a whole empty query tile too."""
    n = 200
    allowed = torch.rand(n, n, generator=torch.Generator().manual_seed(3)) < 0.3
    allowed[5] = False                   # one empty row inside a tile
    allowed[64:128] = False              # a whole query tile with no key
    q, k, v = _inputs(1, n, n, 2, 2, 16, 16)
    out, lse, dq = _check(q, k, v, allowed)
    for rows in (slice(5, 6), slice(64, 128)):
        assert (out[:, rows] == 0).all() and torch.isneginf(lse[:, rows]).all() and (dq[:, rows] == 0).all()


def test_head_dependent_mask():
    """A (B, H, Nq, Nk) bool mask: per-head bitmasks on the tiles shared by all heads."""
    b, h, n = 2, 4, 150
    allowed = torch.rand(b, h, n, n, generator=torch.Generator().manual_seed(4)) < 0.2
    q, k, v = _inputs(b, n, n, h, 2, 16, 16)
    _check(q, k, v, allowed)


def test_non_contiguous_inputs():
    """Heads-first storage seen heads-last, and a strided feature dim (copied): same answers."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 150, 16, generator=g).transpose(1, 2)                  # (B, N, H, D), strided rows
    k = torch.randn(1, 150, 2, 32, generator=g)[..., ::2]                         # feature stride 2
    v = torch.randn(1, 2, 150, 24, generator=g).permute(0, 2, 1, 3)
    assert not q.is_contiguous() and k.stride(-1) == 2
    _check(q, k, v, M.sliding_window(30) | M.global_tokens(3))


def test_backward_is_deterministic_with_split_accumulators(monkeypatch):
    """One KV head and B=1 leave fewer tasks than threads: the backward splits the queries into ranges with
    their own dK/dV accumulators, summed in order. Two runs agree bit for bit, and with the reference."""
    monkeypatch.setattr(flash, "_splits", lambda batch, hkv: 3)
    q, k, v = _inputs(1, 300, 300, 2, 1, 16, 16)
    mask = M.causal() & M.sliding_window(100)
    _check(q, k, v, mask)
    grads = []
    for _ in range(2):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        ak.attention(qs, ks, vs, mask, backend="blocked").sum().backward()
        grads.append((qs.grad, ks.grad, vs.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_pooled_scratch_never_leaks_between_calls():
    """The kernel keeps its float32 scratch (packed K / V, dK / dV accumulators) between calls. A call after
    larger and smaller ones with other values, and after release_workspace(), gives bit-identical outputs and
    gradients; buffers first pooled under inference mode serve training calls; two threads calling at once
    each get their own buffers."""
    mask = M.sliding_window(40)

    def run(q, k, v):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out = ak.attention(qs, ks, vs, mask, backend="blocked")
        out.backward(torch.ones_like(out))
        return out.detach(), qs.grad, ks.grad, vs.grad

    small = _inputs(1, 200, 200, 4, 2, 64, 64)
    flash.release_workspace()
    with torch.inference_mode():  # buffers pooled here are written by the training calls below
        ak.attention(*small, mask, backend="blocked")
    first = run(*small)
    run(*_inputs(2, 700, 700, 4, 4, 64, 64))                       # larger: the pool grows
    run(*(10 * t for t in _inputs(1, 130, 130, 4, 2, 64, 64)))      # smaller, other values, reused buffers
    assert all(torch.equal(a, b) for a, b in zip(first, run(*small)))
    flash.release_workspace()
    assert all(torch.equal(a, b) for a, b in zip(first, run(*small)))

    import threading
    results = [None, None]

    def worker(i):
        results[i] = run(*small)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for r in results for a, b in zip(first, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_key_source_equals_the_concatenation(dtype):
    """extra_kv=(k2, v2) attends over [k, k2], [v, v2] (GQA, Dv != D, a ragged total): the same output, lse
    and gradients as the concatenated tensors, and the gradients split back to each source."""
    q, k, v = _inputs(2, 150, 130, 4, 2, 16, 24, dtype)
    k2, v2 = (t[:, :37].mul(0.5) for t in _inputs(2, 37, 37, 4, 2, 16, 24, dtype, seed=1)[1:])
    mask = M.sliding_window(30) | M.global_tokens(3)
    tl = flash.tile_list(mask, 150, 167, *flash.tile_sizes(150, 167, 2))
    grads = []
    for split in (False, True):
        xs = [t.clone().requires_grad_() for t in (q, k, v, k2, v2)]
        if split:
            out, lse = flash.flash_attention(xs[0], xs[1], xs[2], tl, 0.25, extra_kv=(xs[3], xs[4]))
        else:
            out, lse = flash.flash_attention(xs[0], torch.cat(xs[1::2], 1), torch.cat(xs[2::2], 1), tl, 0.25)
        (out.float().square().sum() + lse.sum()).backward()
        grads.append([out, lse] + [x.grad for x in xs])
    for a, b in zip(*grads):
        assert a.shape == b.shape
        assert torch.equal(a, b) if dtype == torch.float32 else torch.allclose(a.float(), b.float(), atol=1e-2)
    with pytest.raises(RuntimeError, match="k2 / v2 must be"):
        flash.flash_attention(q, k, v, tl, 0.25, extra_kv=(k2[..., :8], v2))


def test_inference_path_matches():
    """No grad, no lse: the forward alone (same kernel) gives the same output as with grad."""
    q, k, v = _inputs(1, 190, 190, 4, 4, 16, 16)
    mask = M.causal_blockwise([50, 70, 70])
    with torch.no_grad():
        out = ak.attention(q, k, v, mask, backend="blocked")
    ref = naive_attention(q.double(), k.double(), v.double(), mask.to_dense(190, 190))
    assert_close(out, ref, torch.float32, "out")


def test_explain_names_the_kernel_and_the_fallback(monkeypatch):
    q = torch.randn(1, 128, 2, 16)
    mask = M.sliding_window(16)
    text = ak.explain("attention", q, q, q, mask=mask, backend="blocked", return_lse=True)
    assert "compiled tile kernel (attnkit.kernels.native:" in text and "lse float32" in text
    half = ak.explain("attention", *(t.bfloat16() for t in (q, q, q)), mask=mask, backend="blocked")
    assert "half inputs upcast to float32 tile by tile" in half
    exact = ak.explain("attention", *(t.double() for t in (q, q, q)), mask=mask, backend="blocked")
    assert "torch-ops path (torch.float64 runs the exact torch path" in exact
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    off = ak.explain("attention", q, q, q, mask=mask, backend="blocked")
    assert "torch-ops path (native kernel disabled by ATTNKIT_NATIVE=0)" in off


def test_disabled_kernel_gives_the_same_answers(monkeypatch):
    """ATTNKIT_NATIVE=0 runs the torch-ops path: same output, lse and gradients."""
    q, k, v = _inputs(1, 150, 150, 2, 1, 16, 8)
    mask = M.causal() & M.document([60, 90])
    res = []
    for env in ("1", "0"):
        monkeypatch.setenv("ATTNKIT_NATIVE", env)
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = ak.attention(qs, ks, vs, mask, backend="blocked", return_lse=True)
        out.sum().backward()
        res.append((out, lse, qs.grad, ks.grad, vs.grad))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *res):
        assert_close(a, b, torch.float32, name, grad=name.startswith("d"))


def test_tile_list_is_exact():
    """Entries are the non-empty tiles in order; partial tiles carry the mask's bits; identical ones share."""
    n, bq, bk = 300, 64, 64
    mask = M.sliding_window(70)
    tl = flash.tile_list(mask, n, n, bq, bk)
    cls = mask.blocks(n, n, bq, bk)
    dense = mask.to_dense(n, n)
    assert tl.row_ptr.shape == (1, 1, cls.shape[0] + 1) and tl.cols.numel() == int((cls != 0).sum())
    assert tl.bits.shape[2] < int((cls == 1).sum())  # sliding-window edge tiles repeat: deduplicated
    for i in range(cls.shape[0]):
        for e in range(int(tl.row_ptr[0, 0, i]), int(tl.row_ptr[0, 0, i + 1])):
            j, slot = int(tl.cols[e]), int(tl.slots[e])
            assert (slot < 0) == (cls[i, j] == 2)
            if slot >= 0:
                words = tl.bits[0, 0, slot]                                       # (bq, 1)
                bits = ((words >> torch.arange(64)) & 1).bool()                   # (bq, 64)
                r, c = min(bq, n - i * bq), min(bk, n - j * bk)
                assert torch.equal(bits[:r, :c], dense[i * bq:i * bq + r, j * bk:j * bk + c])


def test_ops_pass_torch_library_checks():
    """Schema and the fake (shape-only) twins agree with the C++ ops."""
    ops = _native.ops()
    q, k, v = _inputs(1, 70, 70, 4, 2, 8, 6)
    tl = flash.tile_list(M.causal(), 70, 70, 32, 64)
    args = (tl.row_ptr, tl.cols, tl.slots, tl.bits, 32, 64, 0.3, 512)
    out, lse = ops.flash_tiles_fwd(q, k, v, *args)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.flash_tiles_fwd, (q, k, v, *args), test_utils=checks)
    torch.library.opcheck(ops.flash_tiles_bwd, (q, k, v, out, torch.randn_like(out), lse, torch.empty(0), *args, 2),
                          test_utils=checks)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["qk_sparse", "hash_sparse"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["MHA", "GQA"])
def test_data_dependent_masks(kind, causal, heads):
    """qk_sparse / hash_sparse: the kernel (per-head tile lists when heads are KV heads, the union with
    per-head bitmasks under GQA) against the reference on the mask's own dense form."""
    from attnkit.masks.hash_sparse import hash_sparse
    from attnkit.masks.qk_sparse import qk_sparse

    hq, hkv = heads
    q, k, v = _inputs(2, 300, 300, hq, hkv, 16, 16)
    m = qk_sparse(q, k, 64, 2, causal=causal) if kind == "qk_sparse" else hash_sparse(q, k, 4, causal=causal)
    assert m.head_dependent and m.lead_shape == (2, hq)
    _check(q, k, v, m)
    dense = m.to_dense(300, 300)                                                  # (B, H, Nq, Nk)
    assert m.count(300, 300) == round(dense.sum().item() / (2 * hq))
    cls = m.head_blocks(300, 300, 64, 64)
    ref = m._dense_head_blocks(300, 300, 64, 64)
    assert torch.equal(cls, ref)
    if kind == "qk_sparse":  # every query block keeps topk key blocks (fewer near the start when causal)
        per_row = m.layout.sum(-1)
        assert per_row.max() == 2 and (causal or bool((per_row == 2).all()))
    if hq == hkv:
        tl = flash.tile_list(m, 300, 300, 64, 64, hkv)
        assert tl.row_ptr.shape[:2] == (2, hq)  # one list per (batch, head)


def test_data_dependent_mask_checks():
    from attnkit.masks.hash_sparse import hash_sparse
    from attnkit.masks.qk_sparse import qk_sparse

    q = torch.randn(1, 64, 2, 8)
    with pytest.raises(ValueError, match="n_buckets must be even"):
        hash_sparse(q, q, 3)
    with pytest.raises(ValueError, match="qk_sparse: q and k"):
        qk_sparse(q[0], q, 16, 1)
    m = qk_sparse(q, q, 16, 1, offset=64)
    with pytest.raises(ValueError, match="does not cover"):
        m.validate(80, 64)


@pytest.mark.parametrize("n,mask,expect", [
    (512, M.sliding_window(64), "sdpa"), (512, M.block_causal(128), "sdpa"),
    (1024, M.sliding_window(256), "blocked"),
    (1024, M.block_causal(256), "blocked"),
])
def test_auto_knows_the_efficiency_length(n, mask, expect):
    """backend=None takes dense-mask SDPA within the efficiency length unless the mask is very sparse,
    and explain says why."""
    q = torch.randn(1, n, 1, 8)
    text = ak.explain("attention", q, q, q, mask=mask)
    assert f"chosen: {expect}" in text
    if expect == "sdpa":
        assert "within the efficiency length" in text
