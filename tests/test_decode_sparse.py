"""TidalDecode (arXiv 2410.05076) and StreamingLLM sinks (arXiv 2309.17453) against their naive definitions."""

from __future__ import annotations

import torch

from attnkit.ops.decode import decode_attention
from attnkit.ops.decode.sparse import TidalDecode, sparse_decode_attention, streaming_attention, topk_positions
from attnkit.reference.naive_decode import (
    naive_decode_attention,
    naive_sparse_decode,
    naive_streaming_attention,
    naive_topk_positions,
)


def _qkv(n=300, seed=0, hq=8, hkv=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 1, hq, d, generator=g, dtype=torch.float64),
            torch.randn(2, n, hkv, d, generator=g, dtype=torch.float64),
            torch.randn(2, n, hkv, d, generator=g, dtype=torch.float64))


def test_topk_and_sparse_match_naive():
    q, k, v = _qkv()
    pos = topk_positions(q, k, 20)
    assert torch.equal(pos, naive_topk_positions(q, k, 20))
    assert torch.allclose(sparse_decode_attention(q, k, v, pos), naive_sparse_decode(q, k, v, pos), atol=1e-12)


def test_tidal_layers_persist_positions_and_full_budget_is_dense():
    layers = [_qkv(seed=s) for s in range(6)]
    td = TidalDecode(sparse_start=2, reselect=(4,), budget=16)
    outs = [td.attend(i, *layers[i]) for i in range(6)]
    sel2 = naive_topk_positions(layers[2][0], layers[2][1], 16)
    sel4 = naive_topk_positions(layers[4][0], layers[4][1], 16)
    for i in (0, 1, 2, 4):   # dense and selection layers
        assert torch.allclose(outs[i], naive_decode_attention(*layers[i]), atol=1e-12)
    # layer 3 reuses layer 2's positions on its own cache; layer 5 those of the re-selection layer 4
    assert torch.allclose(outs[3], naive_sparse_decode(*layers[3], sel2), atol=1e-12)
    assert torch.allclose(outs[5], naive_sparse_decode(*layers[5], sel4), atol=1e-12)
    full = TidalDecode(sparse_start=0, budget=10_000)
    for i in range(3):
        assert torch.allclose(full.attend(i, *layers[i]), naive_decode_attention(*layers[i]), atol=1e-12)


def test_streaming_sinks_match_naive_and_mask():
    q, k, v = _qkv(n=200)
    got = streaming_attention(q, k, v, sinks=4, window=32)
    assert torch.allclose(got, naive_streaming_attention(q, k, v, 4, 32), atol=1e-12)
    # without rotation, the sink path is the decode mask with sinks + window
    assert torch.allclose(decode_attention(q, k, v, window=32, sinks=4, backend="split_kv", split=64),
                          naive_decode_attention(q, k, v, window=32, sinks=4), atol=1e-12)
    # everything kept: positions are the original ones, so it equals plain RoPE attention
    from attnkit.reference.naive_decode import naive_rope
    pos = torch.arange(200)
    want = naive_decode_attention(naive_rope(q, pos[-1:]), naive_rope(k, pos), v)
    assert torch.allclose(streaming_attention(q, k, v, sinks=4, window=200), want, atol=1e-12)
