"""Hybrid softmax/linear layers (MiniMax-M1, arXiv 2506.13585; HydraHead, arXiv 2606.20097;
MiniCPM-SALA, arXiv 2602.11761)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.mechanisms.hybrid import HybridAttention, HybridSpec
from attnkit.ops.linear.decay import tnl_decay
from attnkit.reference.naive_dense import naive_attention
from attnkit.reference.naive_linear import naive_linear_attention
from tolerances import assert_close

D64 = torch.float64


def test_mm1_minimax_layer_types():
    types = HybridSpec(80).layer_types()
    assert [i for i, t in enumerate(types) if t == "softmax"] == list(range(7, 80, 8))
    assert types.count("linear") == 70
    sala = HybridSpec(8, softmax_every=4, head_ratio=3)
    assert sala.layer_types() == ["mixed"] * 3 + ["softmax"] + ["mixed"] * 3 + ["softmax"]
    assert sala.softmax_heads(0, 8) == (0, 1) and sala.softmax_heads(3, 8) == tuple(range(8))


def _heads(layer: HybridAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head outputs before fusion and W_o, from the oracles: (B, N, H, D)."""
    B, N, C = x.shape
    H = layer.num_heads
    q, k, v = layer.qkv(x).view(B, N, 3, H, C // H).unbind(2)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    soft = naive_attention(q, k, v, causal)
    lam = tnl_decay(H, 0, 1).double()
    lin = naive_linear_attention(F.silu(q), F.silu(k), v, decay=lam)
    return soft, lin


def test_hh1_hh2_all_softmax_all_linear_and_head_order():
    """HH1: F = all heads is a softmax layer, F = {} a linear layer; HH2: mixed heads sit in the original order."""
    torch.manual_seed(0)
    x = torch.randn(2, 30, 32, dtype=D64)
    layers = {hs: HybridAttention(32, 4, hs, fusion=None).double() for hs in [(0, 1, 2, 3), (), (2, 0)]}
    for m in layers.values():
        m.load_state_dict(layers[()].state_dict())
        with torch.no_grad():
            m.out.weight.copy_(torch.eye(32))
    soft, lin = _heads(layers[()], x)
    assert_close(layers[(0, 1, 2, 3)](x), soft.reshape(2, 30, 32), D64, "all softmax")
    assert_close(layers[()](x), lin.reshape(2, 30, 32), D64, "all linear")
    mixed = torch.stack([soft[:, :, 0], lin[:, :, 1], soft[:, :, 2], lin[:, :, 3]], 2)
    assert_close(layers[(2, 0)](x), mixed.reshape(2, 30, 32), D64, "head order")


def test_rms_fusion():
    torch.manual_seed(1)
    x = torch.randn(1, 12, 16, dtype=D64)
    m = HybridAttention(16, 2, (1,)).double()
    ref = HybridAttention(16, 2, (1,), fusion=None).double()
    ref.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        m.out.weight.copy_(torch.eye(16))
        ref.out.weight.copy_(torch.eye(16))
        m.gain.copy_(torch.tensor([2.0, 0.5]))
    o = ref(x).view(1, 12, 2, 8)
    fused = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.tensor([2.0, 0.5], dtype=D64)[:, None]
    assert_close(m(x), fused.reshape(1, 12, 16), D64, "fusion")


def test_hh3_prefill_then_decode():
    """HH3: KV cache for softmax heads, state for linear heads; prefill + decode == one full pass."""
    torch.manual_seed(2)
    m = HybridAttention(32, 4, (1, 3))
    x = torch.randn(2, 37, 32)
    full = m(x)
    y, cache = m(x[:, :25], return_cache=True)
    ys = [y]
    for t in range(25, 37):
        y, cache = m(x[:, t:t + 1], cache=cache, return_cache=True)
        ys.append(y)
    assert_close(torch.cat(ys, 1), full, torch.float32, "decode", factor=5)


def test_spec_build_uses_global_layer_index():
    layers = HybridSpec(16, softmax_every=8).build(32, 4)
    assert layers[7].softmax_heads == (0, 1, 2, 3) and layers[8].linear_heads == (0, 1, 2, 3)
    torch.testing.assert_close(torch.tensor(layers[9]._decay), tnl_decay(4, 9, 16))
    x = torch.randn(1, 10, 32)
    for layer in layers:
        x = x + layer(x)
    assert torch.isfinite(x).all()
