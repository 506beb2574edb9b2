"""VMoBA vs its naive reference, the partition functions and the paper's identities."""

import itertools

import pytest
import torch

from attnkit.mechanisms.vmoba import VMoBAAttention
from attnkit.ops.routed.moba import moba_attention
from attnkit.ops.routed.vmoba import (
    VMoBAConfig,
    _threshold_prefix,
    block_shape,
    layer_mode,
    partition_ids,
    partition_perm,
    select_pairs,
    vmoba_attention,
)
from attnkit.reference.naive_routed import dense_flat, naive_block_ids, naive_vmoba
from tolerances import DTYPES, assert_close, compare_fn

GRID = (4, 4, 4)
CFG = VMoBAConfig(block_1d=3, block_2d=(2, 2), block_3d=(2, 2, 2))  # 1-D ragged: frames {0,1,2}, {3}


def _ins(B=2, grid=GRID, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1] * grid[2]
    return {"q": torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64),
            "k": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)}


def _ids(mode, grid=GRID, cfg=CFG):
    return naive_block_ids(grid, mode, cfg.block_1d, cfg.block_2d, cfg.block_3d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,selection,kw", [
    ("1d", "threshold", {"threshold": 0.4}), ("2d", "topk", {"topk": 2}), ("3d", "threshold", {"threshold": 0.25}),
    ("3d", "topk", {"topk": 2.5}), ("3d", "local", {"topk": 3})])
def test_vmoba_matches_reference(mode, selection, kw, dtype):
    ins = _ins()
    ids = _ids(mode)

    def ref(q, k, v):  # route on the inputs as the fast path sees them (half rounding changes routes)
        rq, rk = (t.detach().to(dtype).double() for t in (q, k))
        return naive_vmoba(q, k, v, ids, selection, route_q=rq, route_k=rk, **kw)

    def fast(q, k, v):
        return vmoba_attention(q, k, v, GRID, mode=mode, config=CFG, selection=selection, query_block=8, **kw)

    compare_fn(fast, ref, ins, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["1d", "2d", "3d"])
def test_vmoba_dispatch_inference_matches_reference(mode, dtype):
    """Without autograd the dispatch runs the fused CPU op (own block as the diagonal part in partition
    order, the ragged 1-D block included); it must equal the reference like the autograd path."""
    ins = _ins()
    q, k, v = (ins[n].to(dtype) for n in "qkv")
    ref = naive_vmoba(*(t.double() for t in (q, k, v)), _ids(mode), "threshold", 0.3)
    with torch.no_grad():
        out = vmoba_attention(q, k, v, GRID, mode=mode, config=CFG, threshold=0.3)
    assert_close(out.double(), ref, dtype, "out")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["1d", "3d"])
def test_vmoba_gather_impl_matches_reference(mode, dtype):
    ids = _ids(mode)

    def ref(q, k, v):
        rq, rk = (t.detach().to(dtype).double() for t in (q, k))
        return naive_vmoba(q, k, v, ids, "threshold", 0.3, route_q=rq, route_k=rk)

    compare_fn(lambda q, k, v: vmoba_attention(q, k, v, GRID, mode=mode, config=CFG, threshold=0.3, impl="gather",
                                               query_block=8), ref, _ins(), dtype)


@pytest.mark.parametrize("tau", [0.02, 0.1, 0.25, 0.6, 0.95])
@pytest.mark.parametrize("ties", [False, True])
def test_threshold_selection_topk_shortcut_equals_full_sort(tau, ties):
    """The top-K shortcut keeps exactly the pairs of the stable full sort (ties: lower index first)."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 120, 10, generator=g, dtype=torch.float64)  # fp64: python sums agree
    scores = scores.round() if ties else scores  # many equal masses
    own = torch.arange(120) // 12
    got = select_pairs(scores, own, "threshold", tau)
    flat = scores.reshape(2, 3, -1)
    own_f = torch.zeros(120, 10, dtype=torch.bool)
    own_f[torch.arange(120), own] = True
    own_f = own_f.reshape(-1)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    mass = (flat - lo) / (hi - lo)
    need = tau * mass.sum(-1, keepdim=True) - (mass * own_f).sum(-1, keepdim=True)
    expect = own_f.expand(2, 3, -1).clone()
    for b in range(2):
        for h in range(3):
            acc = 0.0
            for p in sorted(range(mass.shape[-1]), key=lambda p: (-float(mass[b, h, p]), p)):
                if own_f[p]:
                    continue
                if not acc < need[b, h, 0]:
                    break
                expect[b, h, p] = True
                acc += float(mass[b, h, p])
    assert torch.equal(got.reshape(2, 3, -1), expect)
    cand = mass.masked_fill(own_f, -1.0)
    if tau <= 0.1:  # few pairs: the shortcut answers, no full sort
        assert _threshold_prefix(cand, need) is not None


def test_vmoba_selection_is_global_and_nontrivial():
    q, k, v = _ins().values()
    _, sel = vmoba_attention(q, k, v, GRID, mode="3d", config=CFG, threshold=0.25, return_layout=True)
    counts = sel.sum(-1)  # (B, H, N): blocks per query differ across queries (global pool)
    assert counts.min() == 1 and counts.max() > 2 and 1 < counts.float().mean() < 8
    _, sel = vmoba_attention(q, k, v, GRID, mode="3d", config=CFG, selection="topk", topk=3, return_layout=True)
    assert (sel.sum((-1, -2)) == 3 * 64).all() and sel.sum(-1).max() > 3  # exactly k_avg * N pairs
    fracs = [vmoba_attention(q, k, v, GRID, config=CFG, threshold=t, return_layout=True)[1].float().mean()
             for t in (0.1, 0.25, 0.5, 0.75)]
    assert all(a <= b for a, b in itertools.pairwise(fracs))  # monotone in tau


def test_partition_ids_and_perm():
    grid = (2, 4, 4)
    ids1 = partition_ids(grid, block_shape(grid, "1d", VMoBAConfig(block_1d=1)))
    assert ids1.tolist() == [0] * 16 + [1] * 16
    ids2 = partition_ids(grid, block_shape(grid, "2d", VMoBAConfig(block_2d=(2, 2)))).view(2, 4, 4)
    tile = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert torch.equal(ids2[0], tile) and torch.equal(ids2[1], tile)  # a tile spans every frame
    ids3 = partition_ids(grid, block_shape(grid, "3d", VMoBAConfig(block_3d=(1, 2, 4)))).view(2, 4, 4)
    assert torch.equal(ids3[0], torch.tensor([[0] * 4] * 2 + [[1] * 4] * 2))
    assert torch.equal(ids3[1], ids3[0] + 2)
    for mode, cfg in [("1d", CFG), ("2d", CFG), ("3d", CFG)]:
        ids = partition_ids(GRID, block_shape(GRID, mode, cfg))
        assert torch.equal(ids, _ids(mode))
        perm, inv = partition_perm(ids)
        x = torch.randn(1, 64, 3)
        assert torch.equal(x[:, perm][:, inv], x)
        assert (ids[perm].diff() >= 0).all()  # blocks contiguous after the permutation
        if mode == "1d":
            assert torch.equal(perm, torch.arange(64))  # 1-D is the identity
    assert [layer_mode(i) for i in range(6)] == ["1d", "2d", "3d"] * 2


@pytest.mark.parametrize("mode", ["1d", "2d", "3d"])
def test_vmoba_identities(mode):
    q, k, v = _ins(B=1).values()
    dense = dense_flat(q, k, v)
    n = int(_ids(mode).max()) + 1
    kw = {"grid_shape": GRID, "mode": mode, "config": CFG}
    torch.testing.assert_close(vmoba_attention(q, k, v, threshold=1.0, **kw), dense)  # tau = 1 keeps all
    torch.testing.assert_close(vmoba_attention(q, k, v, selection="topk", topk=n, **kw), dense)  # all pairs
    torch.testing.assert_close(vmoba_attention(q, k, v, selection="local", topk=n, **kw), dense)
    _, sel = vmoba_attention(q, k, v, threshold=1.0, return_layout=True, **kw)
    assert sel.all()


def test_vmoba_local_1d_equals_noncausal_moba():
    q, k, v = _ins(B=1).values()
    cfg = VMoBAConfig(block_1d=1)  # 1-D blocks of one frame = 16 tokens
    out = vmoba_attention(q, k, v, GRID, mode="1d", config=cfg, selection="local", topk=2)
    torch.testing.assert_close(out, moba_attention(q, k, v, 16, 2, causal=False))


def test_vmoba_module_shapes_gradcheck_and_errors():
    torch.manual_seed(0)
    m = VMoBAAttention(8, 2, layer_idx=2, block_3d=(1, 2, 2)).double()
    x = torch.randn(1, 2, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(m, (x,), fast_mode=True)
    torch.testing.assert_close(m(x.view(1, 16, 8), grid_shape=(2, 2, 4)), m(x).view(1, 16, 8))
    q, k, v = _ins(B=1).values()
    with pytest.raises(ValueError, match="block_2d"):
        vmoba_attention(q, k, v, GRID, mode="2d", config=VMoBAConfig(block_2d=(3, 2)))
    with pytest.raises(ValueError, match="block_3d"):
        vmoba_attention(q, k, v, GRID, mode="3d", config=VMoBAConfig(block_3d=(3, 2, 2)))
    with pytest.raises(ValueError, match="topk"):
        vmoba_attention(q, k, v, GRID, mode="3d", config=CFG, selection="topk", topk=9)
    with pytest.raises(ValueError, match="topk"):
        vmoba_attention(q, k, v, GRID, mode="3d", config=CFG, selection="local", topk=0)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="threshold"):
            vmoba_attention(q, k, v, GRID, config=CFG, threshold=bad)
    with pytest.raises(ValueError, match="grid_shape"):
        vmoba_attention(q, k, v, (4, 4, 5), config=CFG)
    with pytest.raises(ValueError, match="impl"):
        vmoba_attention(q, k, v, GRID, config=CFG, impl="x")
    with pytest.raises(ValueError, match="selection"):
        vmoba_attention(q, k, v, GRID, config=CFG, selection="x")
    with pytest.raises(ValueError, match="layer_idx"):
        VMoBAAttention(8, 2, layer_idx=-1)
    with pytest.raises(ValueError, match="grid_shape"):
        m(torch.randn(1, 16, 8, dtype=torch.float64))
