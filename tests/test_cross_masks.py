"""Cross-attention masks: exact tiles and counts, the fast path against the reference, identities, clear errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnkit as ak
from attnkit.masks.base import EMPTY, FULL, PARTIAL
from attnkit.masks.cross import (
    causal_cross,
    composite,
    first_frame,
    frame_causal,
    key_padding,
    mixed_attention,
    varlen_cross,
)
from attnkit.ops.cross.varlen import varlen_cross_attention
from attnkit.reference.naive_dense import naive_attention
from tolerances import assert_close

CASES = [
    (key_padding([7, 3, 0], [5, 2, 6]), 6, 7, 3),
    (key_padding([70, 33]), 40, 70, 2),
    (varlen_cross([5, 3, 0, 4], [4, 9, 2, 1]), 12, 16, 1),
    (varlen_cross([50, 30, 40], [40, 90, 10], causal=True), 120, 140, 1),
    (varlen_cross(cu_seqlens_q=[0, 5, 8, 12], cu_seqlens_k=[0, 4, 13, 14], offset=3), 7, 14, 1),
    (causal_cross([0.5, 1, 2.5, float("inf"), -1], [0, 0, 1, 2, 3]), 5, 5, 1),
    (causal_cross(torch.rand(50, generator=torch.Generator().manual_seed(0)) * 3, torch.arange(70.0) / 20), 50, 70, 2),
    (frame_causal(6, 4, 3), 6, 12, 1),
    (frame_causal(60, 4, 30, offset=10), 50, 120, 2),
    (frame_causal(7, 3, 5), 7, 14, 1),     # last frame shorter (P = 5, T = 3, Nk = 14)
]
IDS = [repr(c[0]) for c in CASES]


def _dense_classes(d: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    nq, nk = d.shape[-2:]
    out = torch.zeros((-(-nq // bq), -(-nk // bk)), dtype=torch.int8)
    for i, j in itertools.product(range(out.shape[0]), range(out.shape[1])):
        t = d[..., i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        out[i, j] = FULL if t.all() else (PARTIAL if t.any() else EMPTY)
    return out


@pytest.mark.parametrize(("mask", "nq", "nk", "b"), CASES, ids=IDS)
def test_blocks_and_count_are_exact(mask, nq, nk, b):
    d = mask.to_dense(nq, nk)
    for bq, bk in [(1, 1), (2, 3), (4, 4), (5, 2), (16, 32)]:
        assert torch.equal(mask.blocks(nq, nk, bq, bk), _dense_classes(d, bq, bk)), (bq, bk)
    lead = d.shape[0] * d.shape[1] if d.dim() == 4 else 1
    assert mask.count(nq, nk) == pytest.approx(d.sum().item() / lead)
    assert torch.equal(mask.to_dense(nq, nk), ak.masks.as_mask(mask).to_dense(nq, nk))


@pytest.mark.parametrize(("mask", "nq", "nk", "b"), CASES, ids=IDS)
def test_blocked_backend_matches_the_reference(mask, nq, nk, b):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, n, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (nq, nk, nk))
    ref = ak.attention(q, k, v, mask=mask, backend="reference")
    out = ak.attention(q, k, v, mask=mask, backend="blocked")
    assert_close(out, ref, torch.float64, "out")
    gy = torch.randn_like(ref)
    for name, a, r in zip("qkv", torch.autograd.grad(out, (q, k, v), gy), torch.autograd.grad(ref, (q, k, v), gy)):
        assert_close(a, r, torch.float64, f"d{name}", grad=True)


def test_causal_cross_with_every_time_infinite_is_full_cross_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 2, 8, generator=g, dtype=torch.float64) for n in (9, 13, 13))
    m = causal_cross(torch.full((9,), float("inf")), torch.sort(torch.randn(13, generator=g)).values)
    assert m.density(9, 13) == 1.0
    assert_close(ak.attention(q, k, v, mask=m), naive_attention(q, k, v), torch.float64, "all +inf")
    assert (m.blocks(9, 13, 4, 4) == FULL).all()


def test_causal_cross_by_positions_is_causal_when_positions_are_indices():
    m = causal_cross(torch.arange(10.0), torch.arange(10.0))
    assert torch.equal(m.to_dense(10, 10), ak.masks.causal().to_dense(10, 10))


def test_frame_causal_properties():
    assert frame_causal(8, 1, 5).to_dense(8, 5).all()                                          # T = 1: full
    assert torch.equal(frame_causal(6, 6, 1).to_dense(6, 6), ak.masks.causal().to_dense(6, 6))  # Q = T, P = 1
    d = frame_causal(12, 4, 3).to_dense(12, 12)
    assert (d[1:] >= d[:-1]).all() and d[:, :3].all() and d[-1].all()                          # monotone, frame 0
    for t in (1, 2, 4, 8):
        assert frame_causal(3 * t, t, 5).density(3 * t, 5 * t) == pytest.approx((t + 1) / (2 * t))
    q = torch.randn(1, 12, 1, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(1, 12, 1, 4, dtype=torch.float64, requires_grad=True)
    out = ak.attention(q, kv, kv, mask=frame_causal(12, 4, 3))
    (gk,) = torch.autograd.grad(out[0, 2].sum(), kv)   # query 2 sees frame 0 only: f(2) = ceil(3 * 4 / 12) - 1
    assert gk[0, 3:].abs().max() == 0 and gk[0, :3].abs().max() > 0


def test_varlen_cross_equals_sequences_one_by_one():
    lq, lk = [5, 0, 7, 3], [4, 6, 9, 0]
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, cq[-1], 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, ck[-1], 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for causal in (False, True):
        ref = varlen_cross_attention(q, k, v, cq, ck, causal=causal, backend="reference")
        for s in range(4):  # the reference itself: each pair alone, the empty key sequence gives zeros
            if lq[s] and lk[s] and not causal:
                one = naive_attention(q[:, cq[s]:cq[s + 1]], k[:, ck[s]:ck[s + 1]], v[:, ck[s]:ck[s + 1]])
                assert_close(ref[:, cq[s]:cq[s + 1]], one, torch.float64, f"sequence {s}")
        assert ref[:, cq[3]:].abs().max() == 0
        gy = torch.randn_like(ref)
        gr = torch.autograd.grad(ref, (q, k, v), gy)
        for backend in ("per_sequence", "masked", None):
            out = varlen_cross_attention(q, k, v, cq, ck, causal=causal, backend=backend)
            assert_close(out, ref, torch.float64, f"{backend} out")
            for name, a, r in zip("qkv", torch.autograd.grad(out, (q, k, v), gy), gr):
                assert_close(a, r, torch.float64, f"{backend} d{name}", grad=True)
    assert "per_sequence" in ak.explain("varlen_cross_attention", q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)


def test_offsets_place_the_last_rows():
    m = varlen_cross([5, 3, 4], [4, 9, 1])
    full = m.to_dense(12, 14)
    assert torch.equal(m.with_offset(7).to_dense(5, 14), full[7:])
    f = frame_causal(10, 5, 2)
    assert torch.equal(f.with_offset(4).to_dense(6, 10), f.to_dense(10, 10)[4:])
    kp = key_padding([3, 5], [4, 2])
    assert torch.equal(kp.with_offset(2).to_dense(3, 5), kp.to_dense(5, 5)[..., 2:, :])


@pytest.mark.parametrize(("build", "match"), [
    (lambda: varlen_cross([3, -1], [2, 2]), r"varlen_cross: q_lengths\[1\] must be >= 0"),
    (lambda: varlen_cross([3, 1], [2]), r"q_lengths has 2 sequences but k_lengths has 1"),
    (lambda: varlen_cross(cu_seqlens_q=[0, 3, 2], cu_seqlens_k=[0, 1, 2]), r"cu_seqlens_q must be non-decreasing"),
    (lambda: varlen_cross(cu_seqlens_q=[1, 3], cu_seqlens_k=[0, 1]), r"cu_seqlens_q must start at 0"),
    (lambda: key_padding([3, -2]), r"key_padding: key_lengths\[1\] must be >= 0"),
    (lambda: key_padding([3, 2], [1]), r"query_lengths has 1 entries but key_lengths has 2"),
    (lambda: causal_cross([1.0], [0.0, 2.0, 1.0]), r"causal_cross: key_times must be sorted non-decreasing; "
                                                    r"key_times\[2\] = 1.0 < key_times\[1\] = 2.0"),
    (lambda: causal_cross([float("nan")], [0.0]), r"query_times contains NaN"),
    (lambda: frame_causal(0, 2, 2), r"frame_causal: num_queries must be >= 1"),
])
def test_bad_arguments_name_themselves(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_mismatched_lengths_between_a_mask_and_its_tensors():
    q, k = torch.randn(1, 8, 2, 4), torch.randn(1, 13, 2, 4)
    with pytest.raises(ValueError, match=r"k_lengths \(cu_seqlens_k\) sum to 12 but the keys have Nk=13"):
        ak.attention(q, k, k, mask=varlen_cross([5, 3], [4, 8]))
    with pytest.raises(ValueError, match=r"q_lengths \(cu_seqlens_q\) sum to 7"):
        ak.attention(q, k, k, mask=varlen_cross([5, 2], [4, 9]))
    with pytest.raises(ValueError, match=r"key_lengths go up to 14 but the keys have Nk=13"):
        ak.attention(q, k, k, mask=key_padding([14]))
    with pytest.raises(ValueError, match=r"mask batch/head dims \(2, 1\) do not match"):
        ak.attention(q, k, k, mask=key_padding([3, 4]))
    with pytest.raises(ValueError, match=r"key_times has 12 entries but the keys have Nk=13"):
        ak.attention(q, k, k, mask=causal_cross(torch.zeros(8), torch.arange(12.0)))
    with pytest.raises(ValueError, match=r"T \* P = 12 visual tokens"):
        ak.attention(q, k, k, mask=frame_causal(8, 4, 3))
    with pytest.raises(ValueError, match=r"cu_seqlens_k ends at 12 but k holds 13 packed keys"):
        varlen_cross_attention(q, k, k, [0, 5, 8], [0, 4, 12])


MORE = [
    (lambda: mixed_attention(4), 10, 10),
    (lambda: mixed_attention(4, symmetric=True), 10, 10),
    (lambda: composite(5), 11, 11),
    (lambda: composite(5, offset=3), 8, 11),
    (lambda: first_frame(3, 4), 14, 17),
    (lambda: first_frame(0, 2, offset=2), 6, 8),
]


@pytest.mark.parametrize(("build", "nq", "nk"), MORE)
def test_packed_stream_masks_are_exact(build, nq, nk):
    mask = build()
    test_blocks_and_count_are_exact(mask, nq, nk, 1)
    test_blocked_backend_matches_the_reference(mask, nq, nk, 1)


def test_packed_stream_mask_rules():
    d = mixed_attention(3).to_dense(7, 7)
    assert d[:3, :3].all() and not d[:3, 3:].any() and d[3:].all()
    assert mixed_attention(3, symmetric=True).to_dense(7, 7).all()
    c = composite(3).to_dense(6, 6)
    assert torch.equal(c[:3], torch.eye(6, dtype=torch.bool)[:3])
    assert torch.equal(c[3:], torch.ones(6, 6).tril().bool()[3:])
    f = first_frame(2, 3).to_dense(9, 11)                 # prompt 2, frames of 3: keys [p p | f0 | f1 | f2]
    assert f[0].tolist() == [True] * 5 + [False] * 6
    assert f[4].tolist() == [False, False, True, True, True, True, True, True, False, False, False]
    with pytest.raises(ValueError, match=r"at least 11, got Nk=10"):
        first_frame(2, 3).to_dense(9, 10)
