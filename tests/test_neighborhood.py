"""Neighborhood attention: index rules, the mask object, tiled vs reference (output + every grad), identities."""

from __future__ import annotations

import random

import pytest
import torch

import attnkit as ak
from attnkit.masks.neighborhood import neighborhood_mask
from attnkit.ops.neighborhood import tiled as tiled_mod
from attnkit.ops.neighborhood import tiles as tiles_mod
from attnkit.ops.neighborhood.tiled import neighborhood_tiled
from attnkit.ops.neighborhood.tiles import choose_tile, make_plan
from attnkit.reference.naive_neighborhood import (
    naive_axis_neighbors,
    naive_neighborhood_attention,
    naive_neighborhood_mask,
)
from tolerances import DTYPES, assert_close, compare_fn


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _random_config(rng: random.Random, max_n: int = 8):
    rank = rng.randint(1, 3)
    shape = tuple(rng.randint(1, max_n) for _ in range(rank))
    k = tuple(rng.randint(1, n) for n in shape)
    d = tuple(rng.randint(1, n // kk) for n, kk in zip(shape, k))
    s = tuple(rng.randint(1, kk) for kk in k)
    c = tuple(rng.random() < 0.4 for _ in shape)
    return shape, k, d, s, c


# ---------------------------------------------------------------- index rules (NATTEN worked examples)
@pytest.mark.parametrize("n,k,d,s,causal,expected", [
    (10, 5, 1, 1, False, {0: range(0, 5), 2: range(0, 5), 3: range(1, 6), 6: range(4, 9), 7: range(5, 10)}),
    (10, 4, 1, 1, False, {5: [3, 4, 5, 6]}),
    (8, 3, 1, 2, False, {0: [0, 1, 2], 1: [0, 1, 2], 2: [2, 3, 4], 5: [4, 5, 6], 6: [5, 6, 7], 7: [5, 6, 7]}),
    (8, 4, 1, 2, False, {0: range(4), 3: range(1, 5), 4: range(3, 7), 7: range(4, 8)}),
    (8, 3, 1, 1, True, {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [1, 2, 3], 7: [5, 6, 7]}),
    (8, 4, 1, 2, True, {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: range(4), 4: [2, 3, 4], 5: range(2, 6), 7: range(4, 8)}),
    (9, 3, 1, 3, True, {3: [3], 4: [3, 4], 5: [3, 4, 5]}),
    (10, 3, 3, 1, False, {0: [0, 3, 6], 3: [0, 3, 6], 6: [3, 6, 9], 9: [3, 6, 9], 4: [1, 4, 7], 8: [2, 5, 8]}),
    (10, 4, 1, 4, False, {0: range(4), 3: range(4), 4: range(4, 8), 8: range(6, 10), 9: range(6, 10)}),
])
def test_worked_examples_1d(n, k, d, s, causal, expected):
    ref = naive_axis_neighbors(n, k, d, s, causal)
    dense = neighborhood_mask(n, k, d, s, causal).to_dense()
    for i, keys in expected.items():
        assert ref[i] == list(keys)
        assert torch.nonzero(dense[i]).flatten().tolist() == list(keys)


@pytest.mark.parametrize("grid,k,d,s,c,query,rows,cols", [
    ((5, 5), (3, 3), 1, 1, False, (0, 0), {0, 1, 2}, {0, 1, 2}),
    ((5, 5), (3, 3), 1, 1, False, (2, 4), {1, 2, 3}, {2, 3, 4}),
    ((5, 5), (3, 3), 1, 1, (True, False), (0, 2), {0}, {1, 2, 3}),
    ((5, 5), (3, 3), 1, 1, (True, True), (3, 3), {1, 2, 3}, {1, 2, 3}),
    ((6, 6), (2, 4), 1, 1, False, (4, 1), {3, 4}, {0, 1, 2, 3}),
    ((8, 8), (4, 4), 1, (2, 2), False, (4, 4), {3, 4, 5, 6}, {3, 4, 5, 6}),
    ((8, 8), (4, 4), 1, (2, 2), False, (5, 5), {3, 4, 5, 6}, {3, 4, 5, 6}),
    ((8, 8), (3, 3), (2, 2), 1, False, (7, 3), {3, 5, 7}, {1, 3, 5}),
])
def test_worked_examples_2d(grid, k, d, s, c, query, rows, cols):
    pic = neighborhood_mask(grid, k, d, s, c).query(query)
    assert set(torch.nonzero(pic.any(1)).flatten().tolist()) == rows
    assert set(torch.nonzero(pic.any(0)).flatten().tolist()) == cols
    assert int(pic.sum()) == len(rows) * len(cols)


def test_mask_object_matches_naive_exhaustive_1d():
    for n in range(1, 15):
        for k in range(1, n + 1):
            for d in range(1, n // k + 1):
                for s in range(1, k + 1):
                    for c in (False, True):
                        m = neighborhood_mask(n, k, d, s, c)
                        ref = naive_neighborhood_mask((n,), (k,), (d,), (s,), (c,))
                        assert torch.equal(m.to_dense(n, n), ref), (n, k, d, s, c)
                        if not c:
                            assert (ref.sum(1) == k).all()  # shifted, never clipped
                        assert ref.diagonal().all()  # every query sees itself


def test_mask_object_multi_d_and_blocks():
    rng = random.Random(0)
    for _ in range(40):
        shape, k, d, s, c = _random_config(rng)
        m = neighborhood_mask(shape, k, d, s, c)
        n = m.n
        ref = naive_neighborhood_mask(shape, k, d, s, c)
        assert torch.equal(m.to_dense(n, n), ref)
        i = torch.arange(n)
        assert torch.equal(m.mask_mod(0, 0, i[:, None], i[None, :]), ref)
        assert m.count(n, n) == int(ref.sum())
        bq, bk = rng.randint(1, 9), rng.randint(1, 9)
        cls = m.blocks(n, n, bq, bk)
        for a in range(cls.shape[0]):
            for b in range(cls.shape[1]):
                t = ref[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
                assert cls[a, b] == (2 if t.all() else 1 if t.any() else 0)


def test_mask_repr_name_picture_and_algebra():
    m = neighborhood_mask((8, 8), 3, dilation=2, is_causal=(True, False))
    assert "kernel_size=(3, 3)" in repr(m) and m.name == "neighborhood_3x3_d2x2_causal10"
    pic = m.picture((7, 3))
    assert "Q" in pic and pic.count("#") == int(m.query((7, 3)).sum()) - 1
    assert "Q" in neighborhood_mask(9, 3).picture(4) and "[1]" in neighborhood_mask((3, 4, 4), 3).picture(0)
    assert "neighborhood_3x3" in ak.masks.show(neighborhood_mask((5, 5), 3), 25)
    both = neighborhood_mask(16, 5) & ak.masks.causal()
    assert torch.equal(both.to_dense(16, 16), neighborhood_mask(16, 5).to_dense() & torch.ones(16, 16).tril().bool())
    with pytest.raises(ValueError, match="nq"):
        m.to_dense(10, 10)


# ---------------------------------------------------------------- tiled vs reference, every gradient
CONFIGS = [
    # shape, kernel, dilation, stride, causal, Hq, Hkv
    ((17,), 5, 1, 1, False, 2, 2),
    ((16,), 4, 1, 1, False, 2, 1),
    ((19,), 3, 3, 1, False, 2, 2),
    ((15,), 5, 2, 3, True, 4, 2),
    ((8, 9), (3, 4), 1, (1, 2), (False, True), 2, 1),
    ((7, 10), 3, (2, 3), 1, False, 2, 2),
    ((9, 8), (4, 8), 1, (4, 8), False, 2, 2),
    ((4, 5, 6), (3, 2, 4), (1, 2, 1), (1, 2, 3), (False, True, False), 2, 1),
    ((5, 4, 4), 2, 1, 2, (True, False, False), 2, 2),
]


def _ids(c):
    shape, k, d, s, causal, hq, hkv = c
    return f"S{'x'.join(map(str, shape))}-k{k}-d{d}-s{s}-c{causal}-H{hq}/{hkv}".replace(" ", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_tiled_matches_reference(cfg, dtype):
    shape, k, d, s, causal, hq, hkv = cfg
    D = 8
    inputs = {"q": _rand(2, *shape, hq, D, seed=1), "k": _rand(2, *shape, hkv, D, seed=2),
              "v": _rand(2, *shape, hkv, D, seed=3)}
    kw = dict(dilation=d, stride=s, is_causal=causal)
    compare_fn(lambda q, k_, v: ak.neighborhood_attention(q, k_, v, k, backend="tiled", **kw),
               lambda q, k_, v: naive_neighborhood_attention(q, k_, v, k, d, s, causal),
               {"q": inputs["q"], "k_": inputs["k"], "v": inputs["v"]}, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_tiled_lse_and_its_gradient(dtype):
    # lse feeds the loss too: exercises the dlse branch of the backward (and Dv != D, the matmul path)
    inputs = {"q": _rand(1, 6, 7, 4, 8, seed=1), "k": _rand(1, 6, 7, 2, 8, seed=2), "v": _rand(1, 6, 7, 2, 5, seed=3)}
    kw = dict(dilation=(1, 2), stride=(2, 1), is_causal=(False, True))
    compare_fn(lambda q, k, v: ak.neighborhood_attention(q, k, v, 3, backend="tiled", return_lse=True, **kw),
               lambda q, k, v: naive_neighborhood_attention(q, k, v, 3, return_lse=True, **kw), inputs, dtype)


@pytest.mark.parametrize("table_bytes", [64 << 20, 0], ids=["mask-table", "one-class-chunks"])
def test_tiled_random_sweep_fp64_with_forced_tiles_and_chunks(monkeypatch, table_bytes):
    # tiny chunks force many chunk boundaries; table_bytes=0 makes every chunk hold one mask class
    monkeypatch.setattr(tiled_mod, "_CHUNK_BYTES", 1 if table_bytes else 1 << 20)
    monkeypatch.setattr(tiles_mod, "_TABLE_BYTES", table_bytes)
    rng = random.Random(7 + table_bytes)
    for it in range(10):
        shape, k, d, s, c = _random_config(rng, max_n=7)
        tile = tuple(rng.choice([1, 2, 3, 5]) for _ in shape)
        plan = make_plan(shape, k, d, s, c, tile)
        q = _rand(2, *shape, 2, 4, seed=it).requires_grad_()
        kk = _rand(2, *shape, 1, 4, seed=it + 100).requires_grad_()
        v = _rand(2, *shape, 1, 4, seed=it + 200).requires_grad_()
        flat = [t.reshape(2, -1, t.shape[-2], 4) for t in (q, kk, v)]
        out, lse = neighborhood_tiled(*flat, plan, 0.7)
        ref, rlse = naive_neighborhood_attention(q, kk, v, k, d, s, c, scale=0.7, return_lse=True)
        torch.testing.assert_close(out.view_as(ref), ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse.view_as(rlse), rlse, atol=1e-10, rtol=1e-10)
        g = _rand(*ref.shape, seed=it + 300)
        a = torch.autograd.grad((out.view_as(ref) * g).sum(), (q, kk, v))
        b = torch.autograd.grad((ref * g).sum(), (q, kk, v))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_gradcheck_fp64():
    q = _rand(1, 3, 4, 2, 2, seed=1).requires_grad_()
    k = _rand(1, 3, 4, 1, 2, seed=2).requires_grad_()
    v = _rand(1, 3, 4, 1, 2, seed=3).requires_grad_()

    def f(q, k, v):  # the LSE output takes the matmul backward (gradient through lse)
        return ak.neighborhood_attention(q, k, v, (2, 2), dilation=(1, 2), stride=(2, 1), is_causal=(False, True),
                                         backend="tiled", return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v))
    q1, k1, v1 = (_rand(1, 7, 2, 2, seed=i).requires_grad_() for i in range(3))  # fused-kernel backward
    assert torch.autograd.gradcheck(lambda q, k, v: ak.neighborhood_attention(q, k, v, 3, backend="tiled"),
                                    (q1, k1, v1))


# ---------------------------------------------------------------- identities
def test_kernel_equal_extent_is_dense_attention():
    q, k, v = _rand(2, 6, 5, 4, 8, seed=1), _rand(2, 6, 5, 2, 8, seed=2), _rand(2, 6, 5, 2, 8, seed=3)
    out = ak.neighborhood_attention(q, k, v, (6, 5))
    dense = ak.attention(q.reshape(2, 30, 4, 8), k.reshape(2, 30, 2, 8), v.reshape(2, 30, 2, 8))
    torch.testing.assert_close(out.reshape(2, 30, 4, 8), dense)


def test_causal_full_kernel_1d_is_causal_attention():
    q, k, v = (_rand(1, 23, 2, 8, seed=i) for i in range(3))
    out = ak.neighborhood_attention(q, k, v, 23, is_causal=True)
    torch.testing.assert_close(out, ak.attention(q, k, v, mask=ak.masks.causal()))


def test_stride_equal_kernel_is_blocked_attention():
    q, k, v = (_rand(1, 24, 2, 8, seed=i) for i in range(3))
    out = ak.neighborhood_attention(q, k, v, 6, stride=6)
    torch.testing.assert_close(out, ak.attention(q, k, v, mask=ak.masks.chunked(6)))
    out_c = ak.neighborhood_attention(q, k, v, 6, stride=6, is_causal=True)
    torch.testing.assert_close(out_c, ak.attention(q, k, v, mask=ak.masks.chunked(6) & ak.masks.causal()))
    # 2-D: non-overlapping 4x4 windows (Swin without shift)
    q2, k2, v2 = (_rand(1, 8, 12, 2, 8, seed=i) for i in range(3))
    out2 = ak.neighborhood_attention(q2, k2, v2, 4, stride=4)

    def part(t):  # (1, 8, 12, H, D) -> (6, 16, H, D) windows
        return t.view(1, 2, 4, 3, 4, 2, 8).permute(0, 1, 3, 2, 4, 5, 6).reshape(6, 16, 2, 8)

    blocks = ak.attention(part(q2), part(k2), part(v2))
    torch.testing.assert_close(part(out2), blocks)


def test_general_pattern_matches_ak_attention_with_the_mask():
    q, k, v = (_rand(1, 6, 7, 2, 8, seed=i) for i in range(3))
    m = neighborhood_mask((6, 7), (3, 4), (2, 1), (1, 2), (True, False))
    out = ak.neighborhood_attention(q, k, v, (3, 4), dilation=(2, 1), stride=(1, 2), is_causal=(True, False))
    flat = ak.attention(q.reshape(1, 42, 2, 8), k.reshape(1, 42, 2, 8), v.reshape(1, 42, 2, 8), mask=m)
    torch.testing.assert_close(out.reshape(1, 42, 2, 8), flat)


def test_kernel_one_is_identity_on_values_and_dilation_is_subsequences():
    q, k, v = (_rand(1, 11, 2, 4, seed=i) for i in range(3))
    torch.testing.assert_close(ak.neighborhood_attention(q, k, v, 1), v)
    out = ak.neighborhood_attention(q, k, v, 3, dilation=3)
    for g in range(3):
        sub = ak.neighborhood_attention(q[:, g::3], k[:, g::3], v[:, g::3], 3)
        torch.testing.assert_close(out[:, g::3], sub)


def test_large_case_runs_tiled_and_matches_reference_on_a_slice():
    # several chunks, full interior tiles: compare to the reference on the whole (small enough) grid
    q, k, v = (_rand(1, 40, 40, 2, 16, dtype=torch.float32, seed=i) for i in range(3))
    out = ak.neighborhood_attention(q, k, v, 7)
    ref = naive_neighborhood_attention(q, k, v, 7)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert choose_tile((40, 40), (7, 7), (1, 1), (1, 1), (False, False)) is not None


# ---------------------------------------------------------------- bad input, dispatch
@pytest.mark.parametrize("shape,kw,match", [
    ((1, 8, 2, 4), dict(kernel_size=9), "larger than the extent"),
    ((1, 8, 2, 4), dict(kernel_size=3, dilation=3), "dilation \\* kernel_size"),
    ((1, 8, 2, 4), dict(kernel_size=3, stride=4), "stride 4 is larger than kernel_size"),
    ((1, 8, 8, 2, 4), dict(kernel_size=(3, 3, 3)), "kernel_size has 3 entries"),
    ((1, 8, 8, 2, 4), dict(kernel_size=3, is_causal=(True,)), "is_causal has 1 entries"),
    ((1, 8, 8, 2, 4), dict(kernel_size=3, dilation=(1, 1, 1)), "dilation has 3 entries"),
    ((1, 8, 2, 4), dict(kernel_size=0), "kernel_size must be >= 1"),
])
def test_bad_input_raises_value_error(shape, kw, match):
    q = torch.randn(*shape)
    with pytest.raises(ValueError, match=match):
        ak.neighborhood_attention(q, q, q, **kw)


def test_heads_first_tensor_is_named_in_the_error():
    q = torch.randn(1, 8, 64, 16)  # (B, H, N, D) by mistake: read as X=8 with 64 heads
    with pytest.raises(ValueError, match="heads-last"):
        ak.neighborhood_attention(q, q, q, 13)
    with pytest.raises(ValueError, match="heads-last"):
        ak.neighborhood_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), 3)
    with pytest.raises(ValueError, match="spatial extent"):
        ak.neighborhood_attention(torch.randn(1, 8, 2, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 2)
    with pytest.raises(TypeError):
        ak.neighborhood_attention(torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), 2.5)


def test_explain_and_forced_backends():
    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    text = ak.explain("neighborhood_attention", q, q, q, kernel_size=5)
    assert "-> tiled" in text and "flex" in text and "natten" in text
    with pytest.raises(ValueError, match="flex"):
        ak.neighborhood_attention(q, q, q, 5, backend="flex")  # forward only; q needs grad
    with pytest.raises(ValueError, match="unknown backend"):
        ak.neighborhood_attention(q, q, q, 5, backend="nope")
    ref = ak.neighborhood_attention(q, q, q, 5, backend="reference")
    torch.testing.assert_close(ak.neighborhood_attention(q, q, q, 5), ref)


@pytest.mark.slow
def test_flex_backend_forward_matches_reference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = (_rand(1, 16, 10, 4, 16, dtype=torch.float32, seed=i) for i in range(3))
    kw = dict(dilation=(2, 1), stride=(1, 2), is_causal=(False, True))
    with torch.no_grad():
        out = ak.neighborhood_attention(q, k, v, (3, 4), backend="flex", **kw)
        with pytest.raises(ValueError, match="LSE"):
            ak.neighborhood_attention(q, k, v, (3, 4), backend="flex", return_lse=True, **kw)
        with pytest.raises(ValueError, match="at least 128 tokens"):
            ak.neighborhood_attention(q[:, :8], k[:, :8], v[:, :8], (3, 4), backend="flex", **kw)
    torch.testing.assert_close(out, naive_neighborhood_attention(q, k, v, (3, 4), **kw), atol=2e-5, rtol=1e-4)


def test_tiled_refuses_non_cpu_tensors():
    q = torch.randn(1, 8, 8, 2, 4, device="meta")
    text = ak.explain("neighborhood_attention", q, q, q, kernel_size=3)
    assert "tiled      cannot run: needs CPU tensors, got meta" in text and "-> window" in text
    with pytest.raises(ValueError, match=r"backend 'tiled' cannot run .*needs CPU tensors, got meta"):
        ak.neighborhood_attention(q, q, q, 3, backend="tiled")


def test_explain_shows_the_tiled_path():
    q = torch.randn(1, 8, 8, 2, 4)
    text = ak.explain("neighborhood_attention", q, q, q, kernel_size=3)
    assert "-> tiled" in text and "path: compiled tile kernel: query boxes" in text and "no input needs" in text
    text = ak.explain("neighborhood_attention", q.requires_grad_(), q, q, kernel_size=3)
    assert "compiled tile kernel" in text and "the kernel's backward from the saved lse" in text
    # float64 keeps the torch-ops path, and says why
    qd = torch.randn(1, 8, 8, 2, 4, dtype=torch.float64)
    text = ak.explain("neighborhood_attention", qd, qd, qd, kernel_size=3)
    assert "path: inference (fused CPU flash op per chunk; tile kernel not used: torch.float64" in text
    text = ak.explain("neighborhood_attention", qd.requires_grad_(), qd, qd, kernel_size=3)
    assert "path: training (fused CPU flash op per chunk" in text and "an input needs a gradient" in text
    v = torch.randn(1, 8, 8, 2, 6, dtype=torch.float64)  # Dv != D: the fused op cannot take it
    text = ak.explain("neighborhood_attention", qd, qd, v, kernel_size=3)
    assert "matmul softmax per chunk (fused CPU op needs Dv == D" in text


# ----- the compiled tile kernel path (query / key boxes in tile order) -----

_KERNEL_CASES = [
    # (spatial, kernel, dilation, stride, causal, H, Hkv)
    ((75,), 9, 2, 1, True, 4, 2),
    ((13, 17), (5, 3), (1, 2), 1, (False, True), 2, 1),
    ((6, 7, 9), (3, 3, 5), (2, 1, 1), (1, 2, 1), (False, False, True), 2, 2),
    ((16, 16), 7, 1, (2, 3), False, 8, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _KERNEL_CASES)
def test_kernel_path_matches_reference(case, dtype):
    """``tiled`` on the tile kernel: output, lse and every gradient (including the lse's) vs the fp64 oracle."""
    from attnkit.kernels import native

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    shape, ks, ds, ss, cs, H, Hkv = case
    B, D, Dv = 2, 16, 8
    q, k, v = (_rand(B, *shape, h, dd, seed=i) for i, (h, dd) in enumerate([(H, D), (Hkv, D), (Hkv, Dv)]))
    text = ak.explain("neighborhood_attention", q.to(dtype), k.to(dtype), v.to(dtype), kernel_size=ks, dilation=ds,
                      stride=ss, is_causal=cs)
    assert "path: compiled tile kernel" in text
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ak.neighborhood_attention(*ins, ks, dilation=ds, stride=ss, is_causal=cs, return_lse=True)
    ro, rl = naive_neighborhood_attention(*refs, ks, ds if isinstance(ds, tuple) else (ds,) * len(shape),
                                          ss if isinstance(ss, tuple) else (ss,) * len(shape),
                                          cs if isinstance(cs, tuple) else (cs,) * len(shape), D ** -0.5, True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    go, gl = _rand(*ro.shape, seed=7), _rand(*rl.shape, seed=8)
    grads = torch.autograd.grad((out.double() * go).sum() + (lse.double() * gl).sum(), ins)
    rgrads = torch.autograd.grad((ro * go).sum() + (rl * gl).sum(), refs)
    assert_close(out, ro, dtype, "out")
    assert_close(lse, rl, torch.float32 if dtype == torch.float32 else dtype, "lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(g, r, dtype, name, grad=True)


def test_kernel_path_equals_torch_ops_fallback(monkeypatch):
    """ATTNKIT_NATIVE=0 runs the tiles x halos path: same numbers (fp32), and explain says why."""
    shape, B, H, D = (12, 20), 1, 4, 16
    q, k, v = (_rand(B, *shape, H, D, dtype=torch.float32, seed=i).requires_grad_() for i in range(3))
    out = ak.neighborhood_attention(q, k, v, (5, 7), dilation=(2, 1), is_causal=(False, True))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    text = ak.explain("neighborhood_attention", q, k, v, kernel_size=(5, 7), dilation=(2, 1), is_causal=(False, True))
    assert "tile kernel not used: native kernel disabled by ATTNKIT_NATIVE=0" in text
    out0 = ak.neighborhood_attention(q, k, v, (5, 7), dilation=(2, 1), is_causal=(False, True))
    grads0 = torch.autograd.grad(out0.sum(), (q, k, v))
    assert_close(out, out0, torch.float32, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, grads0):
        assert_close(g, r, torch.float32, name, grad=True)


def test_kernel_plan_boxes_cover_the_mask_exactly():
    """The tile list's pairs reproduce the NA mask in tile order (full tiles all allowed, the rest by bitmask)."""
    from attnkit.ops.neighborhood.kernel import kernel_plan

    shape, ks, ds, ss, cs = (9, 14), (3, 5), (2, 1), (1, 2), (True, False)
    plan = kernel_plan(shape, ks, ds, ss, cs)
    tl = plan.tl
    dense = neighborhood_mask(shape, ks, ds, ss, cs).to_dense()  # (N, N)
    qsrc = torch.arange(dense.shape[0]) if plan.q_src is None else plan.q_src
    ksrc = torch.arange(dense.shape[0]) if plan.k_src is None else plan.k_src
    got = torch.zeros(qsrc.numel(), ksrc.numel(), dtype=torch.bool)
    rp = tl.row_ptr[0, 0]
    for i in range(rp.numel() - 1):
        for e in range(int(rp[i]), int(rp[i + 1])):
            j, slot = int(tl.cols[e]), int(tl.slots[e])
            if slot < 0:
                blk = torch.ones(tl.bq, tl.bk, dtype=torch.bool)
            else:
                words = tl.bits[0, 0, slot]  # (bq, words)
                blk = ((words[:, :, None] >> torch.arange(64)) & 1).bool().flatten(1)[:, :tl.bk]
            got[i * tl.bq:(i + 1) * tl.bq, j * tl.bk:(j + 1) * tl.bk] = blk
    q_real = torch.zeros(qsrc.numel(), dtype=torch.bool)
    q_real[plan.q_inv if plan.q_inv is not None else torch.arange(dense.shape[0])] = True
    want = dense[qsrc][:, ksrc]
    # every real query row sees exactly its window; padded rows and duplicated padding keys see nothing extra
    assert torch.equal(got[q_real][:, :ksrc.numel()] & want[q_real], got[q_real])
    assert int(got[q_real].sum()) == int(dense.sum())
    assert not got[~q_real].any()
