"""PSA's inference fast path (``attnkit.ops.routed.psa_fused``) vs the naive pyramid reference.

``pyramid_sparse_attention``'s ``fused`` backend runs only without autograd and below fp64, so these
tests call it under ``torch.no_grad()`` in fp32/bf16/fp16 (the gradient tests of
test_pyramid_sparse.py cover the differentiable path)."""

import pytest
import torch

from attnkit.ops.routed.psa import psa_importance, psa_level_map, pyramid_sparse_attention
from attnkit.ops.routed.psa_fused import causal_diag_ok
from attnkit.reference.naive_routed import naive_pyramid_attention
from tolerances import assert_close

CASES = [
    # N, Nq, bq, bk, causal, Hq, Hkv
    pytest.param(128, 128, 16, 8, True, 4, 2, id="causal-GQA"),
    pytest.param(128, 128, 16, 8, False, 4, 4, id="noncausal"),
    pytest.param(128, 120, 16, 8, False, 2, 1, id="noncausal-ragged-q-MQA"),
    pytest.param(120, 120, 16, 8, True, 2, 2, id="causal-ragged-q"),
    pytest.param(128, 128, 8, 8, True, 2, 2, id="causal-bq=bk"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,Nq,bq,bk,causal,Hq,Hkv", CASES)
def test_fused_matches_reference(N, Nq, bq, bk, causal, Hq, Hkv, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Nq, Hq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, N, Hkv, 16, generator=g, dtype=torch.float64) for _ in range(2))
    M = psa_level_map(psa_importance(q, k, bq, bk, causal=causal), (0.2, 0.1, 0.1, 0.2), causal=causal,
                      block_q=bq, block_kv=bk)
    if causal:
        assert causal_diag_ok(M, bq, bk, Nq)
    with torch.no_grad():
        got = pyramid_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), M, bq, bk, causal=causal,
                                       backend="fused")
    assert got.dtype == dtype
    assert_close(got.double(), naive_pyramid_attention(q, k, v, M, bq, bk, causal=causal), dtype, "out")


def test_causal_split_needs_factor_one_diagonal():
    M = torch.ones(1, 1, 4, 8, dtype=torch.long)
    assert causal_diag_ok(M, 16, 8, 64)
    M[0, 0, 2, 5] = 2  # a diagonal block pooled: the general (masked) path must run instead
    assert not causal_diag_ok(M, 16, 8, 64)
    assert not causal_diag_ok(torch.ones(1, 1, 8, 4, dtype=torch.long), 8, 16, 64)  # bq % bk != 0
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        got = pyramid_sparse_attention(q.float(), k.float(), v.float(), M, 16, 8, causal=True)
    assert_close(got.double(), naive_pyramid_attention(q, k, v, M, 16, 8, causal=True), torch.float32, "out")
