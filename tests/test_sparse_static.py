"""S2-Attention and MoA (static per-head sparse patterns) vs element-mask references, identities."""

import pytest
import torch

from attnkit.mechanisms.moa import MoA
from attnkit.mechanisms.s2_attention import S2Attention
from attnkit.ops.per_head.moa import moa_attention, moa_spans
from attnkit.ops.per_head.s2 import S2Mask, s2_attention, s2_layout
from attnkit.reference.naive_dense import causal_dense, naive_masked_attention
from attnkit.reference.naive_per_head import naive_moa_mask, naive_s2_mask
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("impl,backend", [("masked", "blocked"), ("masked", None), ("gather", None)])
def test_s2_paths_gqa_dense_heads(impl, backend, causal, dtype):
    """Every path vs the element mask (output and grads): GQA 4:2 with a dense last KV head, the
    per-KV-head ak.attention calls forced onto the blocked tile walk or chosen automatically."""
    mask = naive_s2_mask(2, 30, 4, 2, 4, causal)
    mask[:, -1] = causal_dense(30, 30) if causal else True  # num_dense_heads=1
    mask = mask.repeat_interleave(2, dim=1)  # pattern indexed by KV head
    compare_fn(lambda q, k, v: s2_attention(q, k, v, 4, 2, 4, causal=causal, num_dense_heads=1, impl=impl,
                                            backend=backend),
               lambda q, k, v: naive_masked_attention(q, k, v, mask)[0], _ins(B=2, Hkv=2), dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_s2_mask_tile_classes_exact(causal):
    """S2Mask's tile classes (prefix-sum coarse + refinement) equal the dense mask's, ragged tiles too."""
    m = S2Mask(16, 3, 4, 1, causal)
    dense = m.to_dense(300, 290)
    for bq, bk in [(128, 64), (30, 7), (16, 16), (16, 100)]:
        cls = m.blocks(300, 290, bq, bk)
        for i in range(cls.shape[0]):
            for j in range(cls.shape[1]):
                t = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                assert cls[i, j] == (2 if t.all() else 1 if t.any() else 0), (bq, bk, i, j)
    lay = s2_layout(4, 19, 3, 4, causal=causal)[1]  # head 1: phase 1
    expect = lay.repeat_interleave(16, 0).repeat_interleave(16, 1)[:300, :290]
    assert torch.equal(dense, expect & causal_dense(300, 290) if causal else expect)


def test_s2_gqa_and_identities():
    q, k, v = _ins(Hq=4, Hkv=2).values()
    # pattern indexed by KV head; dkernel's stripe step max(1, v // Hq) = 1: KV heads take phases 0 and 1
    # (naive_s2_mask with v heads lists phase h for head h)
    mask = naive_s2_mask(4, 30, 4, 2, 4)[:, [0, 1]].repeat_interleave(2, dim=1)
    torch.testing.assert_close(s2_attention(q, k, v, 4, 2, 4), naive_masked_attention(q, k, v, mask)[0])
    # gqa_rule="kv": step max(1, v // Hkv) = 2, the per-KV-head naive mask
    mask = naive_s2_mask(2, 30, 4, 2, 4).repeat_interleave(2, dim=1)
    torch.testing.assert_close(s2_attention(q, k, v, 4, 2, 4, gqa_rule="kv"), naive_masked_attention(q, k, v, mask)[0])
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
    m = S2Attention(8, 2, block_size=2, local_blocks=1, vert_stride=2, causal=True).double()
    torch.autograd.gradcheck(lambda x: m(x), (torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True),),
                             fast_mode=True)
    q, k, v = _ins().values()
    with pytest.raises(ValueError, match="vert_stride"):
        s2_attention(q, k, v, 4, 2, 0)
    with pytest.raises(ValueError, match="block_size"):
        s2_attention(q, k, v, 0, 2, 2)
    with pytest.raises(ValueError, match="impl"):
        s2_attention(q, k, v, 4, 2, 2, impl="nope")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moa_matches_reference(dtype):
    al, be = torch.tensor([3.0, 8.0, -2.0, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.5])
    mask = naive_moa_mask(moa_spans(al, be, 30), 2, 30)
    compare_fn(lambda q, k, v: moa_attention(q, k, v, al, be, sink=2, block_size=4),
               lambda q, k, v: naive_masked_attention(q, k, v, mask)[0], _ins(B=2, Hkv=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl,backend", [("masked", "blocked"), ("masked", None), ("gather", None)])
@pytest.mark.parametrize("alphas", [[5.0, 5.0, 9.0, 9.0], [5.0, 9.0, 5.0, 9.0], [4.0, 4.0, 4.0, 4.0]],
                         ids=["whole_kv_groups", "split_kv_groups", "one_span"])
def test_moa_span_groups_match_reference(alphas, impl, backend, dtype):
    """The per-span ak.attention path (and the gather path) vs the element mask, output and grads,
    with span groups that cover whole GQA groups, split them, or are all heads."""
    al, be = torch.tensor(alphas), torch.zeros(4)
    mask = naive_moa_mask(moa_spans(al, be, 30), 3, 30)
    compare_fn(lambda q, k, v: moa_attention(q, k, v, al, be, sink=3, block_size=4, impl=impl, backend=backend),
               lambda q, k, v: naive_masked_attention(q, k, v, mask)[0], _ins(B=2, Hkv=2), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_moa_inference_writes_head_groups_in_place(dtype):
    """Without autograd the span groups are written straight into the output (no cat/reorder)."""
    q, k, v = (t.to(dtype) for t in _ins(B=2, Hkv=2).values())
    al, be = torch.tensor([5.0, 9.0, 5.0, 12.0]), torch.zeros(4)
    ref = naive_masked_attention(q.double(), k.double(), v.double(), naive_moa_mask(moa_spans(al, be, 30), 3, 30))[0]
    with torch.no_grad():
        out = moa_attention(q, k, v, al, be, sink=3, backend="blocked")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **({} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}))


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
