"""Agent attention (arXiv 2312.08874): the exact identities AG1-AG5 and the biased path vs an fp64 oracle."""

from __future__ import annotations

import torch

import attnkit as ak
from attnkit.mechanisms.agent import AgentAttention
from attnkit.ops.linear.agent import agent_attention
from attnkit.reference.naive_dense import naive_attention
from tolerances import assert_close, compare_fn

D64 = torch.float64


def _qkv(N=24, H=2, D=8, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, N, H, D, generator=g, dtype=D64) for _ in range(3))
    a = torch.randn(2, n, H, D, generator=g, dtype=D64)
    return q, k, v, a


def test_ag1_two_softmax_composition():
    """AG1: AgentAttn(Q, K, V) == SDPA(Q, A, SDPA(A, K, V)) with the softmax oracle twice."""
    q, k, v, a = _qkv()
    expect = naive_attention(q, a, naive_attention(a, k, v))
    assert_close(agent_attention(q, k, v, a), expect, D64, "AG1")


def test_ag2_generalised_linear_attention():
    """AG2: P_q (P_a V) == (P_q P_a) V == ak.linear_attention(P_q, P_a^T, V, non-causal); V = 1 -> 1."""
    q, k, v, a = _qkv()
    tau = 8 ** -0.5
    Pq = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, a) * tau, -1)  # (B, H, N, n)
    Pa = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", a, k) * tau, -1)  # (B, H, n, N)
    o = agent_attention(q, k, v, a)
    assert_close(o, torch.einsum("bhnm,bhmk,bkhd->bnhd", Pq, Pa, v), D64, "(P_q P_a) V")
    lin = ak.linear_attention(Pq.permute(0, 2, 1, 3), Pa.permute(0, 3, 1, 2), v, causal=False, scale=1.0)
    assert_close(o, lin, D64, "as linear attention with phi_q = P_q, phi_k = P_a^T")
    ones = agent_attention(q, k, torch.ones_like(v), a)
    assert_close(ones, torch.ones_like(ones), D64, "row-stochastic")


def test_ag3_one_agent_gives_one_output():
    """AG3: n = 1 -> every query gets the same output (the agent is the mean query)."""
    torch.manual_seed(0)
    m = AgentAttention(16, 2, num_agents=1, grid=(4, 5), agent_bias=False, dwc=False).double()
    y = m(torch.randn(2, 4, 5, 16, dtype=D64)).reshape(2, 20, 16)
    assert_close(y, y[:, :1].expand_as(y), D64, "AG3")


def test_ag4_full_resolution_agents_are_the_queries():
    m = AgentAttention(16, 2, num_agents=16, grid=(4, 4))
    q = torch.randn(2, 16, 16)
    torch.testing.assert_close(m.agents(q, (4, 4)), q)


def test_ag5_zero_bias_equals_unbiased_and_module_composition():
    """AG5 + module structure: zero bias params == agent_bias=False; without DWC equals proj(AG1 composition)."""
    torch.manual_seed(1)
    biased = AgentAttention(16, 2, num_agents=4, grid=(4, 6), dwc=True).double()
    plain = AgentAttention(16, 2, num_agents=4, grid=(4, 6), dwc=True, agent_bias=False).double()
    plain.load_state_dict(biased.state_dict(), strict=False)
    for n, p in biased.named_parameters():
        if n.endswith("_bias") and p.dim() > 1:
            p.data.zero_()
    x = torch.randn(2, 4, 6, 16, dtype=D64)
    assert_close(biased(x), plain(x), D64, "AG5")
    nodwc = AgentAttention(16, 2, num_agents=4, grid=(4, 6), dwc=False, agent_bias=False).double()
    q, k, v = nodwc.qkv(x.reshape(2, 24, 16)).chunk(3, -1)
    a = nodwc.agents(q, (4, 6)).reshape(2, 4, 2, 8)
    q, k, v = (t.reshape(2, 24, 2, 8) for t in (q, k, v))
    expect = nodwc.proj(naive_attention(q, a, naive_attention(a, k, v)).reshape(2, 24, 16)).reshape(x.shape)
    assert_close(nodwc(x), expect, D64, "module")


def test_biased_agent_attention_vs_oracle_with_grads():
    """Agent bias enters both softmaxes additively: fp32 fast path vs materialised fp64, output and grads."""
    q, k, v, a = _qkv(N=20, n=4)
    g = torch.Generator().manual_seed(7)
    b1 = torch.randn(2, 4, 20, generator=g, dtype=D64) * 0.3
    b2 = torch.randn(2, 20, 4, generator=g, dtype=D64) * 0.3

    def ref(q, k, v, a, b1, b2):
        s = 8 ** -0.5
        va = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(torch.einsum("bnhd,bmhd->bhnm", a, k) * s + b1, -1), v)
        return torch.einsum("bhnm,bmhd->bnhd", torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, a) * s + b2, -1), va)

    def fast(q, k, v, a, b1, b2):
        return agent_attention(q, k, v, a, bias1=b1, bias2=b2)

    compare_fn(fast, ref, dict(q=q, k=k, v=v, a=a, b1=b1, b2=b2), torch.float32)


def test_shapes_1d_rectangular_and_resized_grids():
    torch.manual_seed(2)
    m1 = AgentAttention(16, 2, num_agents=5, grid=(30,))
    x = torch.randn(2, 30, 16, requires_grad=True)
    m1(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert m1(torch.randn(1, 17, 16)).shape == (1, 17, 16)  # other length: biases resized
    m2 = AgentAttention(16, 2, num_agents=9, grid=(6, 4))
    assert m2(torch.randn(1, 6, 4, 16)).shape == (1, 6, 4, 16)
    assert m2(torch.randn(1, 9, 7, 16)).shape == (1, 9, 7, 16)  # other grid: row/col biases resized
