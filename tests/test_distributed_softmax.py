"""Softmax context parallelism: ring, Ulysses, USP vs the single-process oracle.

CP1 every method on P = 2 and P = 4 gloo processes: output, lse and every gradient equal
``ak.attention`` (float64 tight, float32, bfloat16), no mask / causal (contiguous and zigzag) / noncausal
cross attention with Nq != Nk / GQA / Dv != D. CP2 zigzag layout identities. CP3 LSE merge
identities. CP4 Ulysses with H % P != 0 raises. CP5 USP (1,4), (2,2), (4,1) agree.

All multi-process cases of one world size run in ONE ``run_local`` call (spawning costs seconds);
the parent unshards each rank's results and compares.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.distributed import zigzag
from attnkit.distributed._selftest import case_mask, run_cases
from attnkit.distributed.launch import run_local
from attnkit.distributed.ring import block_backward, block_forward, merge, plan, ring_attention
from attnkit.distributed.ulysses import kv_replication
from attnkit.distributed.usp import usp_shard, usp_unshard
from tolerances import assert_close

F64, F32 = torch.float64, torch.float32
NAMES = ("out", "lse", "dq", "dk", "dv")


# ---- CP2: layouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", zigzag.LAYOUTS)
def test_shard_unshard_identity(world, layout):
    x = torch.randn(2, 8 * world, 3, 5)
    parts = [zigzag.shard(x, r, world, layout) for r in range(world)]
    assert all(p.shape == (2, 8, 3, 5) for p in parts)
    assert torch.equal(zigzag.unshard(parts, layout), x)
    # positions name each local token's global index
    idx = torch.arange(8 * world)
    for r, p in enumerate(parts):
        pos = zigzag.positions(8, r, world, layout)
        assert torch.equal(p, x[:, pos]) and torch.equal(zigzag.shard(idx, r, world, layout, dim=0), pos)


@pytest.mark.parametrize("world,c", [(1, 3), (2, 4), (4, 8), (8, 2)])
def test_zigzag_balances_causal_pairs(world, c):
    counts = [zigzag.causal_pairs(2 * c, r, world, "zigzag") for r in range(world)]
    assert counts == [(2 * world - 1) * c * c + c * (c + 1)] * world
    assert sum(counts) == (2 * world * c) * (2 * world * c + 1) // 2


def test_contiguous_causal_pairs_imbalanced():
    assert [zigzag.causal_pairs(16, r, 4) for r in range(4)] == [136, 392, 648, 904]  # §9.2, P=4, c=8


@pytest.mark.parametrize("pu,pr", [(1, 4), (2, 2), (4, 1)])
@pytest.mark.parametrize("layout", zigzag.LAYOUTS)
def test_usp_shard_roundtrip(pu, pr, layout):
    x = torch.randn(1, 32, 2, 3)
    parts = [usp_shard(x, r, pu, pr, layout) for r in range(pu * pr)]
    assert torch.equal(usp_unshard(parts, pu, pr, layout), x)


def test_layout_errors():
    x = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="layout"):
        zigzag.shard(x, 0, 2, "spiral")
    with pytest.raises(ValueError, match="does not split into 8"):
        zigzag.shard(x, 0, 4, "zigzag")
    with pytest.raises(ValueError, match="rank"):
        zigzag.shard(x, 2, 2)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("layout", zigzag.LAYOUTS)
def test_causal_plan_covers_each_allowed_pair_once(world, layout):
    """Global positions (pitfall §9.6): the pieces a rank evaluates over all ring steps are exactly
    its causal pairs, each once."""
    n = 4
    for rank in range(world):
        pq = zigzag.positions(n, rank, world, layout)
        hits = torch.zeros(n, n * world, dtype=torch.int64)
        for src in range(world):
            pk = zigzag.positions(n, src, world, layout)
            for qs, ks, c in plan(rank, src, world, n, True, layout):
                qi, ki = torch.arange(n)[qs], torch.arange(n)[ks]
                allowed = torch.ones(len(qi), len(ki), dtype=torch.int64)
                if c:
                    allowed = allowed.tril()
                hits[qi[:, None], pk[ki][None, :]] += allowed
        want = (pq[:, None] >= torch.arange(n * world)[None, :]).long()
        assert torch.equal(hits, want), (rank, layout)


# ---- CP3: LSE merge -----------------------------------------------------------------------------

def _partial(q, k, v):
    o, lse = ak.attention(q, k, v, return_lse=True)
    return o, lse


def test_merge_associative_and_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=g, dtype=F64) for _ in range(3))
    k, v = torch.randn(2, 12, 3, 4, generator=g, dtype=F64), torch.randn(2, 12, 3, 6, generator=g, dtype=F64)
    parts = [_partial(q, k[:, s], v[:, s]) for s in (slice(0, 3), slice(3, 7), slice(7, 12))]
    left = merge(*merge(*parts[0], *parts[1]), *parts[2])
    right = merge(*parts[0], *merge(*parts[1], *parts[2]))
    swapped = merge(*parts[2], *merge(*parts[1], *parts[0]))
    full = _partial(q, k, v)
    for got in (left, right, swapped):
        assert_close(got[0], full[0], F64, "out")
        assert_close(got[1], full[1], F64, "lse")


def test_merge_with_empty_block_is_identity_and_all_empty_is_zero():
    o = torch.randn(2, 5, 3, 4, dtype=F64)
    lse = torch.randn(2, 5, 3, dtype=F64)
    empty_o, empty_l = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    for got in (merge(o, lse, empty_o, empty_l), merge(empty_o, empty_l, o, lse)):
        assert torch.equal(got[0], o) and torch.equal(got[1], lse)
    zo, zl = merge(empty_o, empty_l, empty_o, empty_l)
    assert torch.equal(zo, empty_o) and torch.isneginf(zl).all()
    # mixed rows: one row empty on both sides, the others not
    l2 = lse.clone()
    l2[:, 0] = float("-inf")
    o2 = o.clone()
    o2[:, 0] = 0
    mo, ml = merge(o2, l2, empty_o, empty_l)
    assert torch.equal(mo, o2) and torch.equal(ml, l2)


# ---- per-block kernels: fused op == matmul formula ----------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_block_kernels_fused_equal_matmul(causal, monkeypatch):
    import attnkit.distributed.ring as ring

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=F64)                    # (B, Hq, Nq, D)
    k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=F64) for _ in range(2))
    do = torch.randn(2, 4, 6, 8, generator=g, dtype=F64)
    fused = block_forward(q, k, v, causal, 0.3, F64)
    fused_g = block_backward(q, k, v, fused[0], fused[1], do, None, causal, 0.3, F64)
    monkeypatch.setattr(ring, "can_fuse", lambda *a: False)
    mm = block_forward(q, k, v, causal, 0.3, F64)
    mm_g = block_backward(q, k, v, mm[0], mm[1], do, None, causal, 0.3, F64)
    for a, b, n in zip((*fused, *fused_g), (*mm, *mm_g), ("o", "lse", "dq", "dk", "dv"), strict=True):
        assert_close(a, b, F64, n)


# ---- CP4 and input errors (no process group needed: raised before any collective) --------------

def test_ulysses_head_split_errors():
    with pytest.raises(ValueError, match="H=6 query heads do not split over P=4"):
        kv_replication(6, 2, 4)
    assert kv_replication(8, 8, 4) == 1
    assert kv_replication(8, 2, 4) == 2   # GQA: each KV head twice
    assert kv_replication(8, 1, 4) == 4   # MQA


def test_ring_input_errors():
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="spiral")
    with pytest.raises(ValueError, match="causal needs q and k shards of one length"):
        ring_attention(q, q[:, :4], q[:, :4], causal=True)
    with pytest.raises(ValueError, match="zigzag needs an even local length"):
        ring_attention(q[:, :5], q[:, :5], q[:, :5], causal=True, layout="zigzag")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ring_attention(torch.randn(1, 6, 3, 4), q, q)


# ---- CP1 / CP5: multi-process runs ---------------------------------------------------------------

def _mk(cid, method, *, nq=16, nk=None, h=4, hkv=2, d=8, dv=8, seed=0, **kw):
    nk = nk or nq
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(id=cid, method=method, q=r(2, nq, h, d), k=r(2, nk, hkv, d), v=r(2, nk, hkv, dv),
                gout=r(2, nq, h, dv), glse=0.1 * r(2, nq, h), **kw)


def _cases(world: int) -> list[dict]:
    cases = []
    for dt in (F64, F32):
        t = "f64" if dt == F64 else "f32"
        cases += [
            _mk(f"ring-full-{t}", "ring", dtype=dt),
            _mk(f"ring-causal-contiguous-{t}", "ring", dtype=dt, causal=True),
            _mk(f"ring-causal-zigzag-{t}", "ring", dtype=dt, causal=True, layout="zigzag"),
            _mk(f"ring-causal-zigzag-nolse-{t}", "ring", dtype=dt, causal=True, layout="zigzag", return_lse=False),
            _mk(f"ring-causal-contiguous-nolse-mqa-{t}", "ring", dtype=dt, causal=True, hkv=1, return_lse=False),
            _mk(f"ring-causal-zigzag-dv6-{t}", "ring", dtype=dt, causal=True, layout="zigzag", dv=6),
            _mk(f"ring-cross-{t}", "ring", dtype=dt, nq=8, nk=24),
            _mk(f"ring-cross-nolse-{t}", "ring", dtype=dt, nq=24, nk=8, return_lse=False),
            _mk(f"ulysses-full-mha-{t}", "ulysses", dtype=dt, hkv=4),
            _mk(f"ulysses-causal-gqa-{t}", "ulysses", dtype=dt, mask="causal"),
            _mk(f"ulysses-window-nolse-{t}", "ulysses", dtype=dt, mask="causal_window", return_lse=False),
            _mk(f"ulysses-cross-mqa-dv6-{t}", "ulysses", dtype=dt, nq=8, nk=24, hkv=1, dv=6),
        ]
    cases += [_mk("ring-causal-zigzag-bf16", "ring", dtype=torch.bfloat16, causal=True, layout="zigzag"),
              _mk("ring-causal-zigzag-nolse-bf16", "ring", dtype=torch.bfloat16, causal=True, layout="zigzag",
                  return_lse=False),
              _mk("ulysses-causal-gqa-bf16", "ulysses", dtype=torch.bfloat16, mask="causal")]
    meshes = [(1, world), (world, 1)] + ([(2, 2)] if world == 4 else [])
    for pu, pr in meshes:
        for layout in zigzag.LAYOUTS:
            cases.append(_mk(f"usp{pu}x{pr}-causal-{layout}-f64", "usp", dtype=F64, causal=True, layout=layout,
                             pu=pu, pr=pr, seed=7))
        cases.append(_mk(f"usp{pu}x{pr}-full-nolse-f64", "usp", dtype=F64, pu=pu, pr=pr, seed=8, return_lse=False))
        cases.append(_mk(f"usp{pu}x{pr}-causal-zigzag-f32", "usp", dtype=F32, causal=True, layout="zigzag",
                         pu=pu, pr=pr, seed=7))
    h_bad = 3 if world == 2 else 6
    cases += [
        _mk("err-ulysses-heads", "ulysses", dtype=F64, h=h_bad, hkv=1,
            expect_error=f"H={h_bad} query heads do not split over P={world}"),
        _mk("err-ring-uneven", "ring", dtype=F64, uneven=True, expect_error="shards of equal shape"),
        _mk("err-ulysses-uneven", "ulysses", dtype=F64, uneven=True, expect_error="shards of equal shape"),
        _mk("err-ring-grad", "ring", dtype=F64, frozen_on_last=True,
            expect_error="requires_grad of the inputs differs"),
        _mk("err-ulysses-grad", "ulysses", dtype=F64, frozen_on_last=True,
            expect_error="requires_grad of the inputs differs"),
    ]
    return cases


def _unshard(case, parts):
    if case["method"] == "usp":
        return usp_unshard(parts, case["pu"], case["pr"], case.get("layout", "contiguous"))
    return zigzag.unshard(parts, case.get("layout", "contiguous"))


def _oracle(case):
    q, k, v = (case[n].clone().requires_grad_(True) for n in "qkv")
    if case["method"] == "ulysses":
        mask = case_mask(case.get("mask"))
    else:
        mask = ak.masks.causal() if case.get("causal") else None
    out, lse = ak.attention(q, k, v, mask, return_lse=True)
    loss = (out * case["gout"]).sum()
    if case.get("return_lse", True):
        loss = loss + (lse * case["glse"]).sum()
    loss.backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


_RUNS: dict[int, tuple[list, list]] = {}


def _run(world):
    if world not in _RUNS:
        cases = _cases(world)
        payload = [{k: v for k, v in c.items() if k != "id"} for c in cases]
        _RUNS[world] = (cases, run_local(run_cases, world, payload))
    return _RUNS[world]


def _gathered(world, cid):
    cases, res = _run(world)
    i = next(j for j, c in enumerate(cases) if c["id"] == cid)
    case = cases[i]
    per_rank = [res[r][i] for r in range(world)]
    if case.get("expect_error"):
        return case, per_rank
    got = {n: (None if per_rank[0][n] is None else _unshard(case, [p[n] for p in per_rank])) for n in NAMES}
    return case, got


def _cp1_params():
    """(world, case id) for every non-error case of the P=2 and P=4 runs (cheap: tensors are tiny)."""
    return [pytest.param(w, c["id"], id=f"P{w}-{c['id']}") for w in (2, 4) for c in _cases(w)
            if not c.get("expect_error")]


@pytest.mark.slow
@pytest.mark.parametrize("world,cid", _cp1_params())
def test_cp1_matches_single_process(world, cid):
    case, got = _gathered(world, cid)
    want = _oracle(case)
    dt = case["dtype"]
    for n in NAMES:
        if n == "lse" and not case.get("return_lse", True):
            assert got[n] is None
            continue
        assert got[n].dtype == (dt if n != "lse" else F64 if dt == F64 else F32), n  # lse is fp32 unless fp64
        assert_close(got[n], want[n], dt, f"{cid} P={world} {n}", grad=n.startswith("d"))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_cp4_errors_on_every_rank(world):
    cases, res = _run(world)
    for i, c in enumerate(cases):
        if c.get("expect_error"):
            for r in range(world):
                assert res[r][i].startswith("ValueError") and c["expect_error"] in res[r][i], (c["id"], r, res[r][i])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal-contiguous-f64", "causal-zigzag-f64", "full-nolse-f64",
                                  "causal-zigzag-f32"])
def test_cp5_usp_meshes_agree(kind):
    """(P_u, P_r) in {(1, 4), (2, 2), (4, 1)} give the same result (Ulysses, hybrid, ring)."""
    results = [_gathered(4, f"usp{pu}x{pr}-{kind}")[1] for pu, pr in [(1, 4), (2, 2), (4, 1)]]
    dt = F32 if kind.endswith("f32") else F64
    for n in NAMES:
        if results[0][n] is None:
            continue
        for other in results[1:]:
            # fp32: the meshes merge in different orders; both are within TOL of the oracle
            assert_close(other[n], results[0][n], dt, f"usp {kind} {n}", grad=n.startswith("d"),
                         factor=1.0 if dt == F64 else 2.0)
