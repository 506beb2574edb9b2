"""S2-Attention and MoA (static per-head sparse patterns) vs element-mask references, identities."""

import pytest
import torch

from attnkit.mechanisms.moa import MoA, moa_attention, moa_spans
from attnkit.mechanisms.s2_attention import S2Attention, s2_attention, s2_layout
from attnkit.reference.naive_sparse import causal_dense, naive_masked_attention, naive_moa_mask, naive_s2_mask
from tolerances import DTYPES, compare_fn


def _ins(B=1, N=30, Hq=4, Hkv=4, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64),
            "k": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_s2_matches_reference(causal, dtype):
    mask = naive_s2_mask(4, 30, 4, 2, 4, causal)
    compare_fn(lambda q, k, v: s2_attention(q, k, v, 4, 2, 4, causal=causal),
               lambda q, k, v: naive_masked_attention(q, k, v, mask)[0], _ins(B=2), dtype)


def test_s2_gqa_and_identities():
    q, k, v = _ins(Hq=4, Hkv=2).values()
    mask = naive_s2_mask(2, 30, 4, 2, 4).repeat_interleave(2, dim=1)  # pattern indexed by KV head
    torch.testing.assert_close(s2_attention(q, k, v, 4, 2, 4), naive_masked_attention(q, k, v, mask)[0])
    dense_c = naive_masked_attention(q, k, v, causal_dense(30, 30))[0]
    torch.testing.assert_close(s2_attention(q, k, v, 4, 2, 1), dense_c)  # one shard (v = 1)
    torch.testing.assert_close(s2_attention(q, k, v, 4, 8, 4), dense_c)  # full window
    lay = s2_layout(8, 16, 2, 8)
    assert torch.equal(lay.any(0), torch.ones(16, 16, dtype=torch.bool).tril())  # heads cover every past block
    for h in range(7):  # head shift: allow(h+1, i, j) == allow(h, i, j+1) for stripe blocks in range
        i, j = torch.meshgrid(torch.arange(16), torch.arange(15), indexing="ij")
        far = i - (j + 1) >= 2  # both pairs past the local band (l = 2): pure stripes
        assert torch.equal(lay[h + 1, :, :-1][far], lay[h, :, 1:][far])


def test_s2_module_and_errors():
    torch.manual_seed(0)
    m = S2Attention(8, 2, block_size=2, local_blocks=1, vert_stride=2).double()
    torch.autograd.gradcheck(lambda x: m(x), (torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True),),
                             fast_mode=True)
    q, k, v = _ins().values()
    with pytest.raises(ValueError, match="vert_stride"):
        s2_attention(q, k, v, 4, 2, 0)
    with pytest.raises(ValueError, match="block_size"):
        s2_attention(q, k, v, 0, 2, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moa_matches_reference(dtype):
    al, be = torch.tensor([3.0, 8.0, -2.0, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.5])
    mask = naive_moa_mask(moa_spans(al, be, 30), 2, 30)
    compare_fn(lambda q, k, v: moa_attention(q, k, v, al, be, sink=2, block_size=4),
               lambda q, k, v: naive_masked_attention(q, k, v, mask)[0], _ins(B=2, Hkv=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["masked", "gather"])
@pytest.mark.parametrize("alphas", [[5.0, 5.0, 9.0, 9.0], [5.0, 9.0, 5.0, 9.0], [4.0, 4.0, 4.0, 4.0]],
                         ids=["whole_kv_groups", "split_kv_groups", "one_span"])
def test_moa_span_groups_match_reference(alphas, impl, dtype):
    """The per-span ak.attention path (and the gather path) vs the element mask, output and grads,
    with span groups that cover whole GQA groups, split them, or are all heads."""
    al, be = torch.tensor(alphas), torch.zeros(4)
    mask = naive_moa_mask(moa_spans(al, be, 30), 3, 30)
    compare_fn(lambda q, k, v: moa_attention(q, k, v, al, be, sink=3, block_size=4, impl=impl),
               lambda q, k, v: naive_masked_attention(q, k, v, mask)[0], _ins(B=2, Hkv=2), dtype)


def test_moa_identities():
    q, k, v = _ins().values()
    dense_c = naive_masked_attention(q, k, v, causal_dense(30, 30))[0]
    z = torch.zeros(4)
    torch.testing.assert_close(moa_attention(q, k, v, z + 30, z, sink=0, block_size=8), dense_c)  # alpha >= N
    torch.testing.assert_close(moa_attention(q, k, v, z, z + 1, sink=0, block_size=8), dense_c)  # beta = 1
    win = causal_dense(30, 30) & ((torch.arange(30)[:, None] - torch.arange(30)[None]) < 5)  # beta = 0: a window
    torch.testing.assert_close(moa_attention(q, k, v, z + 5, z, sink=0, block_size=8),
                               naive_masked_attention(q, k, v, win)[0])
    with pytest.raises(ValueError, match="alphas"):
        moa_attention(q, k, v, torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="impl"):
        moa_attention(q, k, v, z, z, impl="nope")
    torch.manual_seed(0)
    m = MoA(8, 2, alphas=[2.0, 0.0], betas=[0.0, 0.5], sink=1, block_size=2).double()
    torch.autograd.gradcheck(lambda x: m(x), (torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True),),
                             fast_mode=True)
