"""S2-Attention's block layout under GQA, against hand-computed layouts.

Case: Hq = 8 query heads, Hkv = 2 KV heads, vertical stride v = 4, one local block, 8 key blocks, causal.
A KV head's stripe columns are the blocks j with (j + h * sigma) % v == 0:

* the released dkernel rule (the default), sigma = max(1, v // Hq) = 1: head 0 -> {0, 4}, head 1 -> {3, 7};
* attnkit's former rule (``gqa_rule="kv"``), sigma = max(1, v // Hkv) = 2: head 0 -> {0, 4}, head 1 -> {2, 6}.

The two agree without GQA and when v <= Hkv (sigma = 1 for both).
"""

from __future__ import annotations

import pytest
import torch

from attnkit.ops.per_head.s2 import s2_attention, s2_layout
from attnkit.reference.naive_dense import naive_masked_attention

N_BLOCKS, V = 8, 4


def _hand(stripes: list[set[int]]) -> torch.Tensor:
    """Causal layout with one local block (the diagonal) plus the listed stripe columns per head."""
    lay = torch.zeros(len(stripes), N_BLOCKS, N_BLOCKS, dtype=torch.bool)
    for h, cols in enumerate(stripes):
        for i in range(N_BLOCKS):
            for j in range(i + 1):
                lay[h, i, j] = (i == j) or (j in cols)
    return lay


DKERNEL_RULE = _hand([{0, 4}, {3, 7}])
KV_RULE = _hand([{0, 4}, {2, 6}])


def test_layout_follows_dkernel_sigma_from_query_heads():
    assert torch.equal(s2_layout(2, N_BLOCKS, 1, V, causal=True, num_query_heads=8), DKERNEL_RULE)


def test_kv_rule_is_the_option_sigma_from_kv_heads():
    assert torch.equal(s2_layout(2, N_BLOCKS, 1, V, causal=True, num_query_heads=8, gqa_rule="kv"), KV_RULE)
    # without GQA (Hq = H = 2) both rules are v // 2 = 2
    assert torch.equal(s2_layout(2, N_BLOCKS, 1, V, causal=True), KV_RULE)


def test_rules_agree_when_stride_is_at_most_the_kv_heads():
    # v = 2 <= Hkv = 2: sigma = 1 under both rules; head 1's stripes are the odd blocks
    want = torch.zeros(2, N_BLOCKS, N_BLOCKS, dtype=torch.bool)
    for h, cols in enumerate(({0, 2, 4, 6}, {1, 3, 5, 7})):
        for i in range(N_BLOCKS):
            for j in range(i + 1):
                want[h, i, j] = (i == j) or (j in cols)
    for rule in ("dkernel", "kv"):
        assert torch.equal(s2_layout(2, N_BLOCKS, 1, 2, causal=True, num_query_heads=8, gqa_rule=rule), want)


@pytest.mark.parametrize("backend", ["masked", "gather", "reference"])
@pytest.mark.parametrize("rule,layout", [("dkernel", DKERNEL_RULE), ("kv", KV_RULE)])
def test_gqa_op_attends_the_hand_computed_layout(backend, rule, layout):
    # the op with 8 query heads on 2 KV heads equals dense attention under the hand layout, expanded to
    # tokens (block 2), causal, with each KV head's pattern shared by its 4 query heads
    b, n = 2, N_BLOCKS * 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, 8, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, n, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    out = s2_attention(q, k, v, b, 1, V, causal=True, gqa_rule=rule, backend=backend)
    tok = layout.repeat_interleave(b, 1).repeat_interleave(b, 2) & torch.ones(n, n, dtype=torch.bool).tril()
    allowed = tok.repeat_interleave(4, 0).unsqueeze(0)  # (1, Hq, N, N)
    want = naive_masked_attention(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2), allowed)[0]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_bad_gqa_rule_names_the_argument():
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="gqa_rule"):
        s2_attention(q, q[:, :, :2], q[:, :, :2], 2, 1, 4, gqa_rule="hq")
