"""Every mask: to_dense, blocks and density agree with a brute-force evaluation of its predicate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.masks import EMPTY, FULL, PARTIAL

M = ak.masks


def brute_force(mask, nq: int, nk: int) -> torch.Tensor:
    """The predicate called once per (q, kv) pair with scalar index tensors: no broadcasting tricks."""
    out = torch.zeros(nq, nk, dtype=torch.bool)
    zero = torch.tensor(0)
    for i in range(nq):
        for j in range(nk):
            out[i, j] = bool(mask.mask_mod(zero, zero, torch.tensor(i), torch.tensor(j)))
    return out


def tile_truth(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    nqb, nkb = -(-dense.shape[0] // bq), -(-dense.shape[1] // bk)
    out = torch.empty(nqb, nkb, dtype=torch.int8)
    for i in range(nqb):
        for j in range(nkb):
            t = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[i, j] = FULL if t.all() else (PARTIAL if t.any() else EMPTY)
    return out


def check_mask(mask, nq: int, nk: int, tiles=((8, 8), (5, 7), (16, 3))) -> None:
    truth = brute_force(mask, nq, nk)
    dense = mask.to_dense(nq, nk)
    assert dense.dtype == torch.bool and dense.shape == (nq, nk), repr(mask)
    assert torch.equal(dense, truth), f"{mask!r}: to_dense disagrees with mask_mod"
    assert mask.count(nq, nk) == int(truth.sum()), f"{mask!r}: count"
    assert abs(mask.density(nq, nk) - truth.double().mean().item()) < 1e-12, f"{mask!r}: density"
    for bq, bk in tiles:
        got = mask.blocks(nq, nk, bq, bk)
        assert torch.equal(got, tile_truth(truth, bq, bk)), f"{mask!r}: blocks({bq}, {bk})"


SELF_MASKS = [
    M.causal(),
    M.causal(offset=3),
    M.sliding_window(4),
    M.sliding_window(2, 5),
    M.causal() & M.sliding_window(6),
    M.dilated_sliding_window(3, 2),
    M.dilated_sliding_window(2, 3, right=1),
    M.chunked(7),
    M.block_causal(6),
    M.document([10, 3, 17, 7]),
    M.causal() & M.document([10, 3, 17, 7]),
    M.prefix_lm(9),
    M.prefix_lm_document([10, 3, 17, 7], [4, 0, 5, 7]),
    M.global_tokens(3),
    M.sliding_window(3) | M.global_tokens(3),
    M.share_question([8, 4, 10, 15]),
    M.causal_blockwise([12, 9, 16]),
    M.block_causal(5) & M.document([10, 3, 17, 7]),
    M.strided(5),
    M.strided(4, relative=False, phase=1),
    M.sliding_window(2) | M.strided(6),
    ~M.causal(),
    ~M.sliding_window(3),
    ~M.strided(3),
    (M.causal() | M.chunked(8)) & ~M.sliding_window(1),
    M.block_sparse(torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.5, 8),
    M.block_sparse(torch.rand(1, 1, 4, 7, generator=torch.Generator().manual_seed(1)) > 0.4, (10, 6)),
]


@pytest.mark.parametrize("mask", SELF_MASKS, ids=repr)
def test_mask_agrees_with_predicate(mask):
    check_mask(mask, 37, 37)


CROSS_MASKS = [M.causal(), M.sliding_window(3, 8), M.chunked(5), M.prefix_lm(4), M.global_tokens(2),
               M.strided(3), M.causal(offset=20) & M.sliding_window(0, 25, offset=20)]


@pytest.mark.parametrize("mask", CROSS_MASKS, ids=repr)
def test_mask_cross_shapes(mask):
    check_mask(mask, 13, 29)
    check_mask(mask, 29, 13)


@pytest.mark.parametrize("name", [n for n in M.ZOO if n != "full"])
def test_zoo_entries(name):
    mask = M.zoo(name, 40)
    check_mask(mask, 40, 40, tiles=((8, 8), (16, 6)))
    assert name.split("_")[0] in repr(mask) or "(" in repr(mask)


def test_tensor_mask_blocks_and_density():
    g = torch.Generator().manual_seed(3)
    t = torch.rand(33, 21, generator=g) > 0.6
    m = M.as_mask(t)
    assert torch.equal(m.to_dense(33, 21), t)
    assert torch.equal(m.blocks(33, 21, 8, 5), tile_truth(t, 8, 5))
    assert abs(m.density(33, 21) - t.double().mean().item()) < 1e-12


def test_head_dependent_layout_blocks():
    g = torch.Generator().manual_seed(4)
    lay = torch.rand(2, 3, 4, 4, generator=g) > 0.5
    m = M.block_sparse(lay, 8)
    assert m.head_dependent
    dense = m.to_dense(32, 32)                                      # (2, 3, 32, 32)
    assert dense.shape == (2, 3, 32, 32)
    assert torch.equal(dense, lay.repeat_interleave(8, 2).repeat_interleave(8, 3))
    # a tile is FULL only if it is for every (b, h), EMPTY only if it is for every (b, h)
    expected = torch.where(lay.all(1).all(0), FULL, torch.where(lay.any(1).any(0), PARTIAL, EMPTY))
    assert torch.equal(m.blocks(32, 32, 8, 8), expected.to(torch.int8))
    assert abs(m.density(32, 32) - lay.double().mean().item()) < 1e-12


def test_blocks_never_materialise_large():
    """Interval masks classify 1M x 1M tiles from O(N) tables, quickly."""
    n = 1 << 20
    m = M.causal() & M.sliding_window(4096)
    cls = m.blocks(n, n, 1024, 1024)
    assert cls.shape == (1024, 1024)
    # tile row r is FULL on key tiles r-3..r-1 (3 per row once r >= 3), PARTIAL on r-4 and r
    assert int((cls == FULL).sum()) == 0 + 1 + 2 + 3 * 1021
    assert m.count(n, n) == sum(min(i, 4096) + 1 for i in range(0, 4097)) + (n - 4097) * 4097


@pytest.mark.parametrize("bad, err", [
    (lambda: M.sliding_window(-1), ValueError),
    (lambda: M.sliding_window(2, -3), ValueError),
    (lambda: M.sliding_window(1.5), TypeError),
    (lambda: M.chunked(0), ValueError),
    (lambda: M.document([3, 0]), ValueError),
    (lambda: M.document([]), TypeError),
    (lambda: M.strided(0), ValueError),
    (lambda: M.dilated_sliding_window(2, 0), ValueError),
    (lambda: M.prefix_lm(-2), ValueError),
    (lambda: M.share_question([5]), ValueError),
    (lambda: M.prefix_lm_document([4, 4], [5, 1]), ValueError),
    (lambda: M.block_sparse(torch.ones(2, 2), 4), TypeError),
    (lambda: M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 0), ValueError),
    (lambda: M.as_mask("causal"), TypeError),
    (lambda: M.causal() & 3, TypeError),
])
def test_bad_mask_arguments(bad, err):
    with pytest.raises(err):
        bad()


def test_mask_size_mismatch_raises():
    with pytest.raises(ValueError, match="sum of lengths"):
        M.document([4, 4]).to_dense(9, 9)
    with pytest.raises(ValueError, match="does not cover"):
        M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4).blocks(16, 16, 4, 4)


def test_show_and_repr():
    pic = M.show(M.causal() & M.sliding_window(2), 6)
    lines = pic.splitlines()
    assert "causal" in lines[0] and "sliding_window(2)" in lines[0] and "density" in lines[0]
    assert lines[1:] == ["█·····", "██····", "███···", "·███··", "··███·", "···███"]
    big = M.show(M.causal(), 1000).splitlines()
    assert len(big) == 1 + 63 and "tiles" in big[0]
    assert big[1].startswith("▒") and big[-1] == "█" * 62 + "▒"


def test_masks_are_hashable_values():
    assert M.causal() & M.sliding_window(3) == M.causal() & M.sliding_window(3)
    assert hash(M.document([1, 2])) == hash(M.document((1, 2)))


# ---- property-based: random compositions ---------------------------------------------------

def _leaf(offset: int):
    return st.one_of(
        st.just(M.causal(offset)),
        st.builds(lambda a, b: M.sliding_window(a, b, offset=offset), st.integers(0, 6), st.integers(0, 6)),
        st.builds(lambda b: M.chunked(b, offset=offset), st.integers(1, 9)),
        st.builds(lambda b: M.block_causal(b, offset=offset), st.integers(1, 9)),
        st.builds(lambda p: M.prefix_lm(p, offset=offset), st.integers(0, 9)),
        st.builds(lambda n: M.global_tokens(n, offset=offset), st.integers(0, 4)),
        st.builds(lambda s, r: M.strided(s, relative=r, offset=offset), st.integers(1, 5), st.booleans()),
        st.builds(lambda w, d: M.dilated_sliding_window(w, d, offset=offset), st.integers(0, 3), st.integers(1, 3)),
    )


def _masks(offset: int):
    """Random compositions whose leaves share one offset (mixed offsets refuse to combine)."""
    return st.recursive(_leaf(offset), lambda inner: st.one_of(
        st.builds(lambda a, b: a & b, inner, inner),
        st.builds(lambda a, b: a | b, inner, inner),
        st.builds(lambda a: ~a, inner),
    ), max_leaves=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), offset=st.integers(-3, 12), nq=st.integers(1, 23), nk=st.integers(1, 23),
       bq=st.integers(1, 9), bk=st.integers(1, 9))
def test_random_compositions(data, offset, nq, nk, bq, bk):
    mask = data.draw(_masks(offset))
    assert mask.offset == offset
    check_mask(mask, nq, nk, tiles=((bq, bk),))
