"""Masks know their query offset: row i of a call sits at position i + offset.

The property every test here checks: the last ``m`` queries against all ``N`` keys, with
``offset = N - m``, give exactly the last ``m`` rows of the full ``N x N`` call (mask predicate,
``to_dense``, ``blocks``, ``count``/``density``, and ``ak.attention`` on every backend in float64).
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

import attnkit as ak
from attnkit.masks import EMPTY, FULL, PARTIAL
from attnkit.masks.block_sparse import BlockSparse, UnalignedBlockSparse

M = ak.masks
N = 80                      # multiple of 8 (the layouts' block) so that N - 16 is block-aligned
TAILS = (1, 7, 16)          # m: 1 and 7 leave the layouts unaligned
TILES = ((8, 8), (5, 7), (16, 3))


def _layout(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def _extra_masks(n: int) -> dict[str, M.Mask]:
    """Masks beyond the zoo: every other factory, tensor and head-dependent masks, complements."""
    key_pad = torch.ones(1, 1, 1, n, dtype=torch.bool)
    key_pad[..., 3] = False
    return {
        "dilated_sliding_window": M.dilated_sliding_window(4, 3),
        "dilated_causal_right": M.dilated_sliding_window(3, 2, right=1) & M.causal(),
        "strided_relative": M.strided(7, phase=2),
        "strided_absolute": M.strided(5, relative=False, phase=2),
        "not_window": ~M.sliding_window(3),
        "causal_not_chunk": M.causal() & ~M.chunked(16),
        "window_or_strided": M.sliding_window(2) | M.strided(9),
        "prefix_lm_window": M.prefix_lm(10) & M.sliding_window(12),
        "global_tokens": M.global_tokens(5),
        "document_prefix_list": M.prefix_lm_document([3 * n // 8, n // 8, n - n // 2], [4, 0, 9]),
        "block_sparse": M.block_sparse(_layout(0, (n // 8, n // 8)), 8),
        "block_sparse_rect": M.block_sparse(_layout(1, (n // 16, n // 4)), (16, 4)),
        "block_sparse_heads_causal": M.block_sparse(_layout(2, (1, 2, n // 8, n // 8)), 8) & M.causal(),
        "neighborhood_1d_causal": M.neighborhood(n, 9, is_causal=True),
        "neighborhood_2d": M.neighborhood((8, n // 8), (3, 5), dilation=(2, 1)),
        "causal_key_padding": M.causal() & M.as_mask(key_pad),
    }


def all_masks(n: int) -> dict[str, M.Mask]:
    """Every mask of the zoo (but ``full``) and the extras, written for ``n x n`` self-attention."""
    out = {name: M.zoo(name, n) for name in M.ZOO if name != "full"}
    out.update(_extra_masks(n))
    return out


CASES = sorted(all_masks(N))


def brute_force(mask, nq: int, nk: int) -> torch.Tensor:
    """The predicate with broadcast index tensors, batch/head 0 (``(Nq, Nk)``)."""
    b = torch.zeros((), dtype=torch.long)
    out = mask.mask_mod(b, b, torch.arange(nq)[:, None], torch.arange(nk)[None, :])
    return out.expand(nq, nk)


def tile_truth(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Tile classes from a dense ``(..., Nq, Nk)`` mask (FULL/EMPTY only if so for every leading index)."""
    dense = dense.reshape(-1, *dense.shape[-2:])
    nqb, nkb = -(-dense.shape[-2] // bq), -(-dense.shape[-1] // bk)
    out = torch.empty(nqb, nkb, dtype=torch.int8)
    for i in range(nqb):
        for j in range(nkb):
            t = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[i, j] = FULL if t.all() else (PARTIAL if t.any() else EMPTY)
    return out


def _first_lead(dense: torch.Tensor) -> torch.Tensor:
    return dense.reshape(-1, *dense.shape[-2:])[0]


# ---- the mask API ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_tail_rows_equal_full_rows_mask_api(name):
    mask = all_masks(N)[name]
    full = mask.to_dense(N, N)
    for m in TAILS:
        tail = M.align_bottom_right(mask, m, N)
        assert tail.offset in (N - m, None), f"{name}: offset {tail.offset}"
        got = tail.to_dense(m, N)
        assert torch.equal(got, full[..., -m:, :]), f"{name} m={m}: to_dense"
        assert torch.equal(brute_force(tail, m, N), _first_lead(full)[-m:]), f"{name} m={m}: mask_mod"
        want = full[..., -m:, :]
        lead = want.reshape(-1, m, N).shape[0]
        assert tail.count(m, N) == pytest.approx(want.sum().item() / lead, abs=1e-9), f"{name} m={m}: count"
        assert tail.density(m, N) == pytest.approx(want.double().mean().item(), abs=1e-12), f"{name} m={m}: density"
        for bq, bk in TILES:
            assert torch.equal(tail.blocks(m, N, bq, bk), tile_truth(want, bq, bk)), f"{name} m={m}: blocks({bq},{bk})"


@pytest.mark.parametrize("name", [n for n in M.ZOO if n != "full"])
def test_zoo_helper_offset(name):
    m = 9
    assert torch.equal(M.zoo(name, N, offset=N - m).to_dense(m, N), M.zoo(name, N).to_dense(N, N)[-m:])
    assert M.zoo(name, N, offset=0) == M.zoo(name, N)
    assert M.zoo("full", N, offset=5) is None


# ---- ak.attention on every backend, float64 -----------------------------------------------------

def _qkv(n: int, hq: int = 2, hkv: int = 1, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, n, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, n, hkv, d + 2, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("name", CASES)
def test_tail_rows_equal_full_rows_attention(name):
    mask = all_masks(N)[name]
    q, k, v = _qkv(N)
    ref = ak.attention(q, k, v, mask=mask, backend="reference")
    for backend in (None, "blocked", "sdpa", "reference"):
        full = ak.attention(q, k, v, mask=mask, backend=backend)
        torch.testing.assert_close(full, ref, rtol=0, atol=1e-12, msg=f"{name} {backend}: full call")
        for m in TAILS:
            tail = ak.attention(q[:, -m:], k, v, mask=M.align_bottom_right(mask, m, N), backend=backend)
            err = (tail - ref[:, -m:]).abs().max().item()
            assert err <= 1e-12, f"{name} backend={backend} m={m}: last rows differ by {err:.3g}"


@pytest.mark.parametrize("name", ["sliding_window_causal", "causal_document", "block_sparse_heads_causal",
                                  "neighborhood_2d", "strided_relative"])
def test_tail_rows_float32_blocked(name):
    """float32 runs the blocked backend's compiled tile kernel where it is built (float64 runs torch ops)."""
    mask = all_masks(N)[name]
    q, k, v = _qkv(N, seed=2)
    ref = ak.attention(q, k, v, mask=mask, backend="reference")
    q, k, v = q.float(), k.float(), v.float()
    for m in TAILS:
        tail = ak.attention(q[:, -m:], k, v, mask=M.align_bottom_right(mask, m, N), backend="blocked")
        err = (tail.double() - ref[:, -m:]).abs().max().item()
        assert err <= 1e-5, f"{name} m={m}: {err:.3g}"


def test_issue_repro_causal_and_window_decode():
    """Decoding the last 16 of 1024 queries under causal & sliding_window(64), float64."""
    n, m = 1024, 16
    q, k, v = _qkv(n, hq=2, hkv=2, d=16, seed=1)
    full = ak.attention(q, k, v, mask=M.causal() & M.sliding_window(64))
    for backend in (None, "blocked", "sdpa", "reference"):
        last = ak.attention(q[:, -m:], k, v, mask=M.causal(n - m) & M.sliding_window(64, offset=n - m),
                            backend=backend)
        err = (last - full[:, -m:]).abs().max().item()
        assert err <= 1e-12, f"backend={backend}: {err:.3g}"
    # the form that gave 1.39 before (window at offset 0) now refuses, naming both masks and offsets
    with pytest.raises(ValueError, match=r"causal\(offset=1008\).*sliding_window\(64\).*offset 1008.*offset 0"):
        M.causal(n - m) & M.sliding_window(64)


def test_gather_backend_runs_aligned_layouts_and_refuses_unaligned():
    lay = _layout(3, (1, 2, N // 8, N // 8))
    mask = M.block_sparse(lay, 8) & M.causal()
    q, k, v = _qkv(N)
    ref = ak.attention(q, k, v, mask=mask, backend="reference")
    aligned = M.align_bottom_right(mask, 16, N)                       # offset 64: block-aligned
    assert isinstance(aligned.a, BlockSparse) and aligned.a.offset == 64
    out = ak.attention(q[:, -16:], k, v, mask=aligned, backend="gather")
    assert (out - ref[:, -16:]).abs().max().item() <= 1e-12
    unaligned = M.align_bottom_right(mask, 5, N)                      # offset 75: straddles layout rows
    assert isinstance(unaligned.a, UnalignedBlockSparse) and not isinstance(unaligned.a, BlockSparse)
    with pytest.raises(ValueError):
        ak.attention(q[:, -5:], k, v, mask=unaligned, backend="gather")
    out = ak.attention(q[:, -5:], k, v, mask=unaligned)
    assert (out - ref[:, -5:]).abs().max().item() <= 1e-12


# ---- offsets in combinations ---------------------------------------------------------------------

def test_combinators_carry_the_offset():
    a, b = M.causal(7), M.sliding_window(3, offset=7)
    assert (a & b).offset == 7 and (a | b).offset == 7 and (~a).offset == 7 and (~(a & ~b)).offset == 7
    assert (M.strided(3, offset=7) & M.block_causal(4, offset=7)).offset == 7          # generic combinators
    assert (~M.strided(3, offset=7)).offset == 7
    # a bool tensor is in the call's own coordinates: it combines with any offset
    t = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    assert (a & M.as_mask(t)).offset == 7 and (M.as_mask(t) & a).offset == 7 and M.as_mask(t).offset is None


@pytest.mark.parametrize("make", [
    lambda: M.causal(1000) & M.sliding_window(64),
    lambda: M.sliding_window(64) | M.causal(3),
    lambda: M.causal(2) & (M.chunked(4, offset=2) | M.strided(3)),
    lambda: M.document([4, 4], offset=1) & M.causal(),
    lambda: M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4, offset=4) & M.causal(),
    lambda: M.neighborhood(8, 3, offset=2) & ~M.causal(),
])
def test_mismatched_offsets_raise(make):
    with pytest.raises(ValueError, match=r"offset \S+ but .* has offset") as e:
        make()
    assert "cannot combine" in str(e.value)


def test_with_offset_sets_every_leaf_and_replaces():
    m = (M.causal() & M.sliding_window(4)) | M.global_tokens(2)
    m5 = m.with_offset(5)
    assert m5.offset == 5 and repr(m5).count("offset=5") == 3
    assert m5.with_offset(0) == m
    assert M.align_bottom_right(m, 3, 8) == m5
    assert M.align_bottom_right(None, 3, 8) is None
    t = torch.ones(4, 8, dtype=torch.bool)
    assert torch.equal(M.align_bottom_right(t, 4, 8).to_dense(4, 8), t)
    with pytest.raises(TypeError, match="align_bottom_right"):
        M.align_bottom_right("causal", 3, 8)
    with pytest.raises(ValueError, match="nq"):
        M.align_bottom_right(m, 0, 8)


def test_offset_zero_is_the_old_mask():
    assert M.causal(0) == M.causal() == M.causal(offset=0)
    assert M.causal(5) == M.causal(offset=5) and M.causal(-2).offset == -2
    assert M.sliding_window(3, offset=0) == M.sliding_window(3) and repr(M.sliding_window(3)) == "sliding_window(3)"
    assert repr(M.sliding_window(3, 1, offset=4)) == "sliding_window(3, 1, offset=4)"
    assert repr(M.document([2, 3], offset=1)) == "document([2, 3], offset=1)"
    for m in all_masks(N).values():
        assert m.offset in (0, None) and m.with_offset(0) == m


def test_every_factory_takes_offset():
    factories = [M.causal, M.sliding_window, M.dilated_sliding_window, M.chunked, M.block_causal, M.document,
                 M.prefix_lm, M.prefix_lm_document, M.global_tokens, M.share_question, M.causal_blockwise,
                 M.strided, M.block_sparse, M.neighborhood]
    for f in factories:
        assert "offset" in inspect.signature(f).parameters, f.__name__


@pytest.mark.parametrize("bad, err, match", [
    (lambda: M.sliding_window(3, offset=1.5), TypeError, "sliding_window: offset must be an int"),
    (lambda: M.causal(True), TypeError, "causal: offset"),
    (lambda: M.document([3, 4], offset=-1), ValueError, "document: offset must be >= 0"),
    (lambda: M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4, offset=-4), ValueError, "block_sparse"),
    (lambda: M.neighborhood(8, 3, offset=8), ValueError, "past the grid"),
    (lambda: M.document([3, 4], offset=2).to_dense(6, 7), ValueError, "positions 2..7"),
    (lambda: M.document([3, 4], offset=2).to_dense(5, 6), ValueError, "sum of lengths"),
    (lambda: M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4, offset=4).blocks(5, 8, 4, 4), ValueError,
     "does not cover"),
    (lambda: M.neighborhood(8, 3, offset=5).to_dense(4, 8), ValueError, "do not fit the grid"),
    (lambda: M.document([3, 4]).with_offset(-1).to_dense(2, 7), ValueError, "offset=-1"),
])
def test_offsets_outside_absolute_patterns_raise(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


def test_strided_phase_is_not_the_offset():
    """``phase`` picks the residue class; ``offset`` moves the query rows (relative strides only)."""
    rel = M.strided(4, phase=1, offset=6)
    assert torch.equal(rel.to_dense(3, 12), M.strided(4, phase=1).to_dense(9, 12)[-3:])
    cols = M.strided(4, relative=False, phase=1)
    assert torch.equal(cols.with_offset(6).to_dense(3, 12), cols.to_dense(3, 12))   # fixed columns
    assert cols.to_dense(1, 12)[0].nonzero().flatten().tolist() == [1, 5, 9]


def test_offset_blocks_never_materialise_large():
    """1M keys, 16 decoded queries: interval masks classify tiles and count from O(Nq) tables."""
    n, m, w = 1 << 20, 16, 4096
    mask = M.causal(n - m) & M.sliding_window(w, offset=n - m)
    cls = mask.blocks(m, n, 16, 1024)
    assert cls.shape == (1, 1024)
    assert int((cls == FULL).sum()) == 3 and int((cls == PARTIAL).sum()) == 2 and int((cls == EMPTY).sum()) == 1019
    assert mask.count(m, n) == m * (w + 1)
    lay = torch.zeros(n // 1024, n // 1024, dtype=torch.bool)
    lay[-1, :4] = True
    bs = M.block_sparse(lay, 1024, offset=n - m)                        # unaligned: 16 rows in the last block row
    assert bs.count(m, n) == m * 4 * 1024
    assert int((bs.blocks(m, n, 16, 1024) == FULL).sum()) == 4


# ---- ak.masks exports only masks -------------------------------------------------------------------

def test_masks_namespace_exports_only_masks():
    names = set(dir(M))
    assert names == set(M.__all__)
    kinds = {
        "mask classes": {"Mask", "IntervalMask", "TensorMask"},
        "factories": {"causal", "sliding_window", "dilated_sliding_window", "chunked", "block_causal", "document",
                      "prefix_lm", "prefix_lm_document", "global_tokens", "share_question", "causal_blockwise",
                      "strided", "block_sparse", "neighborhood", "qk_sparse", "hash_sparse",
                      "causal_cross", "composite", "first_frame", "frame_causal", "key_padding", "mixed_attention",
                      "varlen_cross"},
        "mask utilities": {"as_mask", "align_bottom_right", "show", "plot", "zoo"},
        "zoo table": {"ZOO"},
        "tile classes of Mask.blocks": {"EMPTY", "PARTIAL", "FULL"},
    }
    assert names == set().union(*kinds.values())
    for name in names:
        obj = getattr(M, name)
        assert not isinstance(obj, types.ModuleType), name
        assert not getattr(obj, "__module__", "attnkit.masks").startswith("attnkit._validate"), name
    for name in kinds["mask classes"]:
        assert issubclass(getattr(M, name), M.Mask)
    for name in kinds["factories"] | kinds["mask utilities"]:
        assert getattr(M, name).__module__.startswith("attnkit.masks"), name
    assert {M.EMPTY, M.PARTIAL, M.FULL} == {0, 1, 2}
    assert all(callable(f) for f in M.ZOO.values())
    assert not hasattr(M, "int_arg") and "torch" not in names
