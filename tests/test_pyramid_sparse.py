"""PSA (pyramid sparse attention) vs its naive reference, and the paper's identities."""

import pytest
import torch

from attnkit.mechanisms.pyramid_sparse import PyramidSparseAttention
from attnkit.ops.routed.psa import PSAConfig, psa_attention, psa_importance, psa_level_map, pyramid_sparse_attention
from attnkit.reference.naive_dense import causal_dense, naive_masked_attention
from attnkit.reference.naive_routed import naive_psa_importance, naive_psa_levels, naive_pyramid_attention
from tolerances import DTYPES, compare_fn


def _ins(B=1, N=32, Hq=4, Hkv=2, D=8, Nq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, Nq or N, Hq, D, generator=g, dtype=torch.float64),
            "k": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)}


def _random_levels(B, H, nqb, nkb, seed=1, causal=False, bq=8, bk=8):
    g = torch.Generator().manual_seed(seed)
    M = torch.tensor([0, 1, 2, 4, 8])[torch.randint(0, 5, (B, H, nqb, nkb), generator=g)]
    M[..., 0] = 1  # no empty row
    if causal:  # the diagonal at full resolution so that every query sees itself
        for i in range(nqb):
            M[..., i * bq // bk: min(nkb, ((i + 1) * bq - 1) // bk + 1)] = 1
    return M


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_pyramid_matches_reference(causal, dtype):
    # bq=8, bk=8, N=32 -> 4x4 tiles with random levels x1..x8 (GQA 4 -> 2 heads)
    M = _random_levels(2, 4, 4, 4, causal=causal)
    compare_fn(lambda q, k, v: pyramid_sparse_attention(q, k, v, M, 8, 8, causal=causal),
               lambda q, k, v: naive_pyramid_attention(q, k, v, M, 8, 8, causal=causal), _ins(B=2), dtype)


def test_pyramid_unequal_blocks_and_ragged_queries():
    ins = _ins(N=32, Nq=27, Hkv=4)  # cross, bq=4 (7 blocks, the last ragged), bk=16
    M = _random_levels(1, 4, 7, 2)
    out = pyramid_sparse_attention(*ins.values(), M, 4, 16)
    torch.testing.assert_close(out, naive_pyramid_attention(*ins.values(), M, 4, 16))
    q, k, v = _ins(N=32, Hkv=4).values()  # causal with bq=16 > bk=8
    M = _random_levels(1, 4, 2, 4, causal=True, bq=16, bk=8)
    torch.testing.assert_close(pyramid_sparse_attention(q, k, v, M, 16, 8, causal=True),
                               naive_pyramid_attention(q, k, v, M, 16, 8, causal=True))


def test_pyramid_identities():
    q, k, v = _ins().values()
    ones = torch.ones(4, 4, dtype=torch.long)
    dense = naive_masked_attention(q, k, v)[0]
    torch.testing.assert_close(pyramid_sparse_attention(q, k, v, ones, 8, 8), dense)  # all x1 == dense
    dense_c = naive_masked_attention(q, k, v, causal_dense(32, 32))[0]
    torch.testing.assert_close(pyramid_sparse_attention(q, k, v, ones, 8, 8, causal=True), dense_c)
    diag = torch.eye(4, dtype=torch.long)  # only the diagonal at x1: block-diagonal attention
    bd = torch.arange(32)[:, None] // 8 == torch.arange(32)[None] // 8
    torch.testing.assert_close(pyramid_sparse_attention(q, k, v, diag, 8, 8), naive_masked_attention(q, k, v, bd)[0])
    # pooled exactness: groups of r equal keys/values at factor r give the dense result (the ln r term)
    for r in (2, 4, 8):
        kr, vr = (t[:, ::r].repeat_interleave(r, dim=1) for t in (k, v))
        want = naive_masked_attention(q, kr, vr)[0]
        torch.testing.assert_close(pyramid_sparse_attention(q, kr, vr, ones * r, 8, 8), want)
        no_bias = naive_pyramid_attention(q, kr, vr, ones * r, 8, 8, use_log_bias=False)
        mixed = ones.clone()
        mixed[:, 1] = r  # one block pooled: without ln r its softmax mass is r times too small
        torch.testing.assert_close(pyramid_sparse_attention(q, kr, vr, mixed, 8, 8), want)
        assert not torch.allclose(naive_pyramid_attention(q, kr, vr, mixed, 8, 8, use_log_bias=False), want)
        torch.testing.assert_close(no_bias, want)  # all at one level: a constant bias cancels


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_router_matches_reference(causal):
    q, k, _ = _ins(N=64, Hq=2, Hkv=1).values()
    S = psa_importance(q, k, 16, 8, causal=causal)
    torch.testing.assert_close(S, naive_psa_importance(q, k, 16, 8, causal=causal))
    g = torch.Generator().manual_seed(3)
    S_rand = psa_importance(q, k, 16, 8, causal=causal, generator=g)
    g = torch.Generator().manual_seed(3)
    oq, ok = torch.randperm(16, generator=g)[:4].sort().values, torch.randperm(8, generator=g)[:2].sort().values
    torch.testing.assert_close(S_rand, naive_psa_importance(q, k, 16, 8, causal, oq.tolist(), ok.tolist()))
    ratios = (0.25, 0.125, 0.0, 0.25)
    M = psa_level_map(S, ratios, causal=causal, block_q=16, block_kv=8)
    assert torch.equal(M, naive_psa_levels(S, ratios, causal, 16, 8))
    if not causal:  # counts per level match the bands: 8 blocks -> 2 x1, 1 x2, 0 x4, 2 x8, 3 skipped
        for f, n in ((1, 2), (2, 1), (4, 0), (8, 2), (0, 3)):
            assert ((M == f).sum(-1) == n).all()


def test_psa_end_to_end_gradcheck_and_module():
    ins = _ins(N=32, Hq=2, Hkv=2)
    cfg = PSAConfig(block_q=8, block_kv=8, mask_ratios=(0.25, 0.25, 0.25, 0.25), causal=True)
    out, M = psa_attention(*ins.values(), cfg, return_levels=True)
    torch.testing.assert_close(out, naive_pyramid_attention(*ins.values(), M, 8, 8, causal=True))
    q, k, v = (t.clone().requires_grad_() for t in ins.values())
    torch.autograd.gradcheck(lambda q, k, v: pyramid_sparse_attention(q, k, v, M, 8, 8, causal=True), (q, k, v),
                             fast_mode=True)
    torch.manual_seed(0)
    m = PyramidSparseAttention(8, 2, block_q=8, block_kv=4, levels=3, mask_ratios=(0.5, 0.25, 0.25)).double()
    torch.autograd.gradcheck(m, (torch.randn(1, 16, 8, dtype=torch.float64, requires_grad=True),), fast_mode=True)


def test_psa_errors():
    q, k, v = _ins().values()
    with pytest.raises(ValueError, match="block_kv"):
        PSAConfig(block_kv=12, levels=4)
    with pytest.raises(ValueError, match="mask_ratios"):
        PSAConfig(mask_ratios=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="mask_ratios"):
        PSAConfig(mask_ratios=(0.5,))
    with pytest.raises(ValueError, match="divisible by block_kv"):
        pyramid_sparse_attention(q, k[:, :30], v[:, :30], torch.ones(4, 4, dtype=torch.long), 8, 8)
    with pytest.raises(ValueError, match="powers of two"):
        pyramid_sparse_attention(q, k, v, torch.full((4, 4), 3), 8, 8)
    with pytest.raises(ValueError, match="blocks"):
        pyramid_sparse_attention(q, k, v, torch.ones(3, 4, dtype=torch.long), 8, 8)
    with pytest.raises(TypeError, match="level_map"):
        pyramid_sparse_attention(q, k, v, torch.ones(4, 4), 8, 8)
    with pytest.raises(ValueError, match="causal PSA"):
        pyramid_sparse_attention(q[:, :16], k, v, torch.ones(2, 4, dtype=torch.long), 8, 8, causal=True)
