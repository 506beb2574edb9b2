"""Linear-family modules: Lightning (TNL, MiniMax), LinearAttention, L2ViT LGA, CARE — against compositions of
the fp64 naive oracle, decay tables (TransNormerLLM, arXiv 2307.14995; MiniMax-01, arXiv 2501.08313),
prefill + decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.mechanisms.lightning import LightningAttention, MiniMaxLightningAttention
from attnkit.mechanisms.linear_attention import CAREAttention, L2ViTAttention, LinearAttention
from attnkit.ops.linear.decay import alibi_slopes, srms_norm, tnl_decay
from attnkit.reference.naive_linear import naive_linear_attention
from tolerances import assert_close


def test_decay_tables_tnl():
    """TN2: the three schedules for H=8, L=24, l=0 (4 decimals), and l = L-1 ~ 1 for 'released'."""
    released = [0.6065, 0.7788, 0.8825, 0.9394, 0.9692, 0.9845, 0.9922, 0.9961]
    paper = [0.3679, 0.1353, 0.0498, 0.0183, 0.00674, 0.00248, 0.000912, 0.000336]
    fla = [1.0, 0.3679, 0.1353, 0.0498, 0.0183, 0.00674, 0.00248, 0.000912]
    torch.testing.assert_close(tnl_decay(8, 0, 24), torch.tensor(released), atol=1e-4, rtol=0)
    torch.testing.assert_close(tnl_decay(8, 0, 24, "paper"), torch.tensor(paper), atol=0, rtol=2e-3)
    torch.testing.assert_close(tnl_decay(8, 0, 24, "fla"), torch.tensor(fla), atol=0, rtol=2e-3)
    torch.testing.assert_close(tnl_decay(8, 23, 24), torch.ones(8), atol=1e-4, rtol=0)
    assert tnl_decay(4, 0, 1).shape == (4,)  # L - 1 = 0 guarded
    with pytest.raises(ValueError, match="schedule"):
        tnl_decay(8, 0, 24, "alibi")


def test_alibi_slopes_non_power_of_two():
    s = alibi_slopes(12)
    expect = [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(torch.tensor(s), torch.tensor(expect))
    assert len(alibi_slopes(64)) == 64 and alibi_slopes(64)[-1] == 2.0 ** -8


def test_decay_table_minimax():
    """MM2: H=64, L=80 at layers 0, 40, 78 (first and last head)."""
    for layer, first, last in ((0, 0.3997, 0.9961), (40, 0.6359, 0.9981), (78, 0.9885, 0.99995)):
        lam = tnl_decay(64, layer, 80)
        assert abs(lam[0].item() - first) < 1e-4 and abs(lam[-1].item() - last) < 1e-4


def _tnl_oracle(m: LightningAttention, x: torch.Tensor) -> torch.Tensor:
    c = m.config
    B, N, _ = x.shape
    xd = x.double()
    if c.style == "tnl":
        q, k, v, u = (xd @ m.qkvu.weight.double().T).chunk(4, -1)
        q, k = F.silu(q), F.silu(k)
    else:
        q, k, v = F.silu(xd @ m.qkv.weight.double().T).chunk(3, -1)
    shape = (B, N, c.num_heads, c.head_dim)
    a = naive_linear_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), decay=m.decay.double(),
                               scale=1.0).reshape(B, N, -1)
    a = a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + c.eps)
    if c.style == "tnl":
        o = a * u
    else:
        o = a * m.norm_weight.double() * torch.sigmoid(xd @ m.gate.weight.double().T)
    return o @ m.out.weight.double().T


@pytest.mark.parametrize("cls", [LightningAttention, MiniMaxLightningAttention])
def test_lightning_module_matches_composition(cls):
    """SA2-style: the module equals projections + naive op + joint H*D norm + gate, and gradients flow."""
    torch.manual_seed(0)
    m = cls(32, 4, layer_idx=1, num_layers=4, chunk_size=16)
    x = torch.randn(2, 50, 32, requires_grad=True)
    y = m(x)
    assert_close(y, _tnl_oracle(m, x.detach()), torch.float32, "y", factor=5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("cls", [LightningAttention, MiniMaxLightningAttention])
def test_lightning_prefill_then_decode(cls):
    """MM3: chunked prefill with return_state, then one token at a time, equals one full pass."""
    torch.manual_seed(1)
    m = cls(32, 4, layer_idx=0, num_layers=2, chunk_size=16)
    x = torch.randn(2, 41, 32)
    full = m(x)
    y, st = m(x[:, :30], return_state=True)
    ys = [y]
    for t in range(30, 41):
        y, st = m(x[:, t:t + 1], state=st, return_state=True)
        ys.append(y)
    assert_close(torch.cat(ys, 1), full, torch.float32, "decode", factor=5)


def test_output_norm_cancels_rescale():
    """TN4 / MM4: SRMSNorm(lightning(c q, k, v)) ~ SRMSNorm(lightning(q, k, v)) for c > 0 (and for v)."""
    torch.manual_seed(2)
    q, k, v = (torch.rand(1, 60, 2, 8, dtype=torch.float64) for _ in range(3))
    lam = tnl_decay(2, 0, 4).double()

    def f(q, k, v):
        return srms_norm(ak.linear_attention(q, k, v, decay=lam, scale=1.0).reshape(1, 60, 16), eps=0.0)

    base = f(q, k, v)
    assert_close(f(3.7 * q, k, v), base, torch.float64, "c q")
    assert_close(f(q, 0.2 * k, v), base, torch.float64, "c k")
    assert_close(f(q, k, 5.0 * v), base, torch.float64, "c v")


def test_decay_is_fp32_constant_under_module_cast():
    m = LightningAttention(16, 2, layer_idx=0, num_layers=3).to(torch.bfloat16)
    assert m.decay.dtype == torch.float32
    torch.testing.assert_close(m.decay, tnl_decay(2, 0, 3))
    assert m(torch.randn(1, 10, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_module(causal):
    torch.manual_seed(3)
    m = LinearAttention(32, 4, causal=causal)
    x = torch.randn(2, 25, 32)
    B, N, C = x.shape
    q = (x @ m.q.weight.T).view(B, N, 4, 8)
    k, v = (x @ m.kv.weight.T).view(B, N, 2, 4, 8).unbind(2)
    o = naive_linear_attention(q.double(), k.double(), v.double(), causal=causal, feature_map="elu+1",
                               normalize=True, scale=1.0)
    assert_close(m(x), (o.reshape(B, N, C) @ m.out.weight.double().T), torch.float32, "y")
    if not causal:  # cross attention with a longer context
        assert m(x, torch.randn(2, 40, 32)).shape == (2, 25, 32)


def test_l2vit_lga_oracle_and_clamp():
    """LV1: equals tau (A V) / max(A 1, 100) with A = relu(Q) relu(K)^T; LV2: V = 1, big denominators -> tau."""
    torch.manual_seed(4)
    m = L2ViTAttention(16, 2).double()
    x = torch.randn(2, 4, 5, 16, dtype=torch.float64)
    q, k, v = m.qkv(x).view(2, 20, 3, 2, 8).unbind(2)
    A = torch.einsum("bnhd,bmhd->bhnm", F.relu(q), F.relu(k))
    o = torch.einsum("bhnm,bmhd->bnhd", A, v) / A.sum(-1).transpose(1, 2)[..., None].clamp_min(100)
    o = m.temperature[:, None] * o
    assert_close(m(x), m.out(o.reshape(2, 4, 5, 16)), torch.float64, "LV1")
    with torch.no_grad():
        m.qkv.weight.zero_()
        m.qkv.bias.copy_(torch.cat([torch.full((32,), 10.0), torch.ones(16)]))  # q = k = 10, v = 1
        m.out.weight.copy_(torch.eye(16))
        m.out.bias.zero_()
    y = m(x)
    assert_close(y, m.temperature.repeat_interleave(8).expand_as(y), torch.float64, "LV2")


def test_care_attention_is_mean_normalised_elu():
    """CA2: equals the normalised non-causal elu+1 oracle with V = x and the mean normaliser."""
    torch.manual_seed(5)
    m = CAREAttention(32, head_dim=16).double()
    x = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    q, k = m.qk(x).view(2, 12, 2, 2, 16).unbind(2)
    v = x.reshape(2, 12, 2, 16)
    pq, pk = F.elu(q) + 1, F.elu(k) + 1
    num = torch.einsum("bnhd,bhde->bnhe", pq, torch.einsum("bmhd,bmhe->bhde", pk, v) / 12)
    den = torch.einsum("bnhd,bhd->bnh", pq, pk.mean(1))[..., None] + 1e-6
    assert_close(m(x), (num / den).reshape(2, 3, 4, 32), torch.float64, "CA2")
