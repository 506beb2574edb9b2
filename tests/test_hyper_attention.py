"""HyperAttention vs the naive estimator with the same randomness, exactness limits, error vs samples."""

import itertools

import pytest
import torch

from attnkit.mechanisms.hyper_attention import HyperAttention
from attnkit.ops.routed.hyper import gray_rank_table, hyper_attention
from attnkit.reference.naive_dense import causal_dense, naive_masked_attention
from attnkit.reference.naive_routed import gray_inverse, naive_hyper_attention
from tolerances import DTYPES, compare_fn


def _ins(B=1, N=32, Hq=4, Hkv=2, D=8, Nq=None, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"q": std * torch.randn(B, Nq or N, Hq, D, generator=g, dtype=torch.float64),
            "k": std * torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)}


CFG = {"block_size": 8, "sample_size": 6, "lsh_bits": 3, "min_seq_len": 8}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_hyper_matches_naive_estimator(causal, dtype):
    # N=32, min 8: the causal path recurses twice (32 -> 16 -> 8); every call samples and hashes
    def fast(q, k, v):
        return hyper_attention(q, k, v, causal=causal, generator=torch.Generator().manual_seed(5), **CFG)

    def ref(q, k, v):  # hash the inputs as the fast path sees them (rounding can flip a bucket bit)
        return naive_hyper_attention(q, k, v, causal=causal, generator=torch.Generator().manual_seed(5),
                                     hash_q=q.detach().to(dtype), hash_k=k.detach().to(dtype), **CFG)

    compare_fn(fast, ref, _ins(B=2), dtype)


def test_hyper_cross_ragged_and_gradcheck():
    ins = _ins(N=27, Nq=19, Hkv=4)  # 4 key blocks (last ragged), query blocks of 5 (last ragged)
    out = hyper_attention(*ins.values(), generator=torch.Generator().manual_seed(1), **CFG)
    torch.testing.assert_close(out, naive_hyper_attention(*ins.values(), generator=torch.Generator().manual_seed(1),
                                                          **CFG))
    q, k, v = (t[:, :16, :2].clone().requires_grad_() for t in ins.values())
    kw = {"block_size": 4, "sample_size": 3, "lsh_bits": 2, "min_seq_len": 4, "causal": True}
    torch.autograd.gradcheck(lambda q, k, v: hyper_attention(q, k, v, generator=torch.Generator().manual_seed(2),
                                                             **kw), (q, k, v), fast_mode=True)


def test_hyper_exact_limits():
    q, k, v = _ins(N=40).values()
    dense = naive_masked_attention(q, k, v)[0]
    dense_c = naive_masked_attention(q, k, v, causal_dense(40, 40))[0]
    g = torch.Generator().manual_seed(0)
    # one block covering every key: the block part is exact and every sample is dropped
    torch.testing.assert_close(hyper_attention(q, k, v, block_size=64, sample_size=16, min_seq_len=8, generator=g),
                               dense)
    torch.testing.assert_close(hyper_attention(q, k, v, min_seq_len=40), dense)  # short: exact
    torch.testing.assert_close(hyper_attention(q, k, v, min_seq_len=40, causal=True), dense_c)
    torch.testing.assert_close(hyper_attention(q, k, v, block_size=64, min_seq_len=10, causal=True, generator=g),
                               dense_c)  # recursion with exact off-diagonal parts is exact
    _, lse = hyper_attention(q, k, v, min_seq_len=40, return_lse=True)
    torch.testing.assert_close(lse, naive_masked_attention(q, k, v)[1])


def test_gray_rank_adjacent_buckets_differ_in_one_bit():
    for bits in (1, 3, 7):
        table = gray_rank_table(bits)
        assert table.tolist() == [gray_inverse(c) for c in range(2 ** bits)]
        codes = torch.empty_like(table).scatter_(0, table, torch.arange(2 ** bits))  # rank -> code
        for a, b in zip(codes[:-1].tolist(), codes[1:].tolist(), strict=True):
            assert bin(a ^ b).count("1") == 1


def test_hyper_error_falls_with_sample_size():
    # spread-out attention (small logits), N=1024: mean relative error over seeds vs exact softmax
    q, k, v = _ins(N=1024, Hq=2, Hkv=2, D=16, std=0.5).values()
    q, k, v = q.float(), k.float(), v.float()
    dense = naive_masked_attention(q, k, v)[0]
    errs = []
    for m in (16, 64, 256, 1024):
        e = [((hyper_attention(q, k, v, block_size=64, sample_size=m, lsh_bits=4, min_seq_len=64,
                               generator=torch.Generator().manual_seed(s)) - dense).norm() / dense.norm()).item()
             for s in range(4)]
        errs.append(sum(e) / len(e))
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 0.5 * errs[0], errs
    print('hyper rel err vs m (16, 64, 256, 1024):', [round(e, 4) for e in errs])


def test_hyper_module_and_errors():
    torch.manual_seed(0)
    m = HyperAttention(8, 2, block_size=4, sample_size=4, lsh_bits=2, min_seq_len=4, causal=True).double()
    x = torch.randn(1, 16, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(m(x), m(x))  # reseeded every forward: a fixed function
    torch.autograd.gradcheck(m, (x,), fast_mode=True)
    q, k, v = _ins().values()
    with pytest.raises(ValueError, match="sample_size"):
        hyper_attention(q, k, v, sample_size=0)
    with pytest.raises(ValueError, match="block_size"):
        hyper_attention(q, k, v, block_size=-1)
    with pytest.raises(ValueError, match="lsh_bits"):
        hyper_attention(q, k, v, lsh_bits=40)
    with pytest.raises(ValueError, match="causal HyperAttention"):
        hyper_attention(q[:, :16], k, v, causal=True)
    with pytest.raises(TypeError, match="generator"):
        hyper_attention(q, k, v, generator=3)
