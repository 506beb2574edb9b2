"""iLLaMA attention (arXiv 2404.06773): soft mask limits, the post-sequence class token, backends vs naive."""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.seq_llama_vit import LlamaViTAttention
from attnkit.ops.sequence.llama_vit import soft_causal_attention, soft_mask_alpha
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_sequence2 import naive_soft_causal_attention
from tolerances import assert_close, compare_fn


def _qkv(N=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, N, 2, 4, generator=g, dtype=torch.float64) for n in "qkv"}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_naive(alpha, dtype):
    compare_fn(lambda **a: soft_causal_attention(**a, alpha=alpha),
               lambda **a: naive_soft_causal_attention(**a, alpha=alpha), _qkv(), dtype)


def test_alpha_limits_are_causal_and_bidirectional():
    t = _qkv()
    N = 9
    causal = naive_masked_attention(t["q"], t["k"], t["v"], torch.ones(N, N, dtype=torch.bool).tril())[0]
    full = naive_masked_attention(t["q"], t["k"], t["v"], torch.ones(N, N, dtype=torch.bool))[0]
    for backend in ("attention", "soft", "reference"):
        assert_close(soft_causal_attention(**t, alpha=0.0, backend=backend), causal, torch.float64, backend)
        assert_close(soft_causal_attention(**t, alpha=1.0, backend=backend), full, torch.float64, backend)
    mid = soft_causal_attention(**t, alpha=0.5)
    assert (mid - causal).abs().max() > 1e-3 and (mid - full).abs().max() > 1e-3


def test_post_sequence_class_token_sees_all_patches_and_patches_ignore_it():
    m = LlamaViTAttention(8, 2).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, -1] += 5  # change the class token: patch outputs unchanged
    assert torch.equal(m(x2)[:, :-1], y[:, :-1])
    x3 = x.clone()
    x3[:, 0] += 5  # change the first patch: the class token's output moves
    assert (m(x3)[:, -1] - y[:, -1]).abs().max() > 1e-6


def test_schedule_and_errors():
    assert soft_mask_alpha(0, 50) == 1.0 and soft_mask_alpha(25, 50) == 0.5 and soft_mask_alpha(80, 50) == 0.0
    with pytest.raises(ValueError, match="soft_causal_attention: alpha"):
        soft_causal_attention(**_qkv(), alpha=1.5)
    with pytest.raises(ValueError, match="LlamaViTAttention"):
        LlamaViTAttention(8, 2, alpha=2.0)
