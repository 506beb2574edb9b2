"""HyperAttention's inference path (one fused softmax per sorted block over [block keys, samples],
fused exact leaves) vs the naive estimator: no autograd, fp32/bf16/fp16 (test_hyper_attention.py
covers the differentiable path and gradients)."""

import pytest
import torch

from attnkit.ops.routed.hyper import hyper_attention
from attnkit.reference.naive_routed import naive_hyper_attention
from tolerances import assert_close

CFG = {"block_size": 8, "sample_size": 6, "lsh_bits": 3, "min_seq_len": 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal,N,Nq", [(False, 32, 32), (True, 32, 32), (False, 27, 19)],
                         ids=["bidir", "causal", "cross-ragged"])
def test_inference_path_matches_naive(causal, N, Nq, dtype):
    g = torch.Generator().manual_seed(0)
    q = 0.5 * torch.randn(2, Nq, 4, 8, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(2, N, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, N, 2, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = hyper_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal,
                              generator=torch.Generator().manual_seed(5), backend="fused", **CFG)
    ref = naive_hyper_attention(q, k, v, causal=causal, generator=torch.Generator().manual_seed(5),
                                hash_q=q.to(dtype), hash_k=k.to(dtype), **CFG)
    assert got.dtype == dtype
    assert_close(got.double(), ref, dtype, "out")
