"""Split-KV decoding (Lean Attention, arXiv 2405.10480) against the naive decode oracle."""

from __future__ import annotations

import pytest
import torch

from attnkit.masks import causal, global_tokens
from attnkit.ops.decode import decode_attention, decode_window, explain, merge_splits
from attnkit.ops.decode.split_kv import split_kv_attention
from attnkit.reference.naive_decode import decode_allowed, naive_decode_attention
from attnkit.reference.naive_dense import naive_attention
from tolerances import assert_close, compare_fn

CASES = [  # (Nq, Nk, offset, window, sinks)
    (1, 1000, None, None, 0), (4, 1000, None, 100, 4), (3, 777, 500, 50, 0), (16, 300, 0, None, 0),
    (2, 513, None, 10, 3), (1, 64, None, 1, 0),
]


def _qkv(nq, nk, dtype, b=2, hq=8, hkv=2, d=16, dv=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nq, hq, d, generator=g, dtype=dtype), torch.randn(b, nk, hkv, d, generator=g, dtype=dtype),
            torch.randn(b, nk, hkv, dv, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"Nq{c[0]}-Nk{c[1]}-off{c[2]}-w{c[3]}-s{c[4]}")
def test_split_kv_exact(case, dtype):
    nq, nk, off, w, s = case
    q, k, v = _qkv(nq, nk, dtype)
    out, lse = decode_attention(q, k, v, offset=off, window=w, sinks=s, split=128, return_lse=True,
                                backend="split_kv")
    ro, rl = naive_decode_attention(q.double(), k.double(), v.double(), offset=off, window=w, sinks=s,
                                    return_lse=True)
    assert out.dtype == dtype and lse.dtype == dtype
    assert_close(out, ro, dtype, "out")
    assert_close(lse, rl, dtype, "lse")


def test_split_kv_gradients_and_half():
    q, k, v = _qkv(2, 300, torch.float64)
    compare_fn(lambda q, k, v: decode_attention(q, k, v, window=40, sinks=2, split=64, backend="split_kv"),
               lambda q, k, v: naive_decode_attention(q, k, v, window=40, sinks=2), {"q": q, "k": k, "v": v},
               torch.float64)
    compare_fn(lambda q, k, v: decode_attention(q, k, v, split=64, backend="split_kv"),
               lambda q, k, v: naive_decode_attention(q, k, v), {"q": q, "k": k, "v": v}, torch.bfloat16)


def test_merge_identities():
    """Any partition merged in any order equals the whole; empty parts are the identity."""
    q, k, v = _qkv(1, 90, torch.float64)
    whole, lse = naive_attention(q, k, v, return_lse=True)
    parts = [(0, 10), (10, 11), (11, 90)]
    outs, lses = zip(*[naive_attention(q, k[:, a:e], v[:, a:e], return_lse=True) for a, e in parts])
    empty_o, empty_l = torch.zeros_like(outs[0]), torch.full_like(lses[0], float("-inf"))
    o, l = merge_splits(torch.stack([outs[2], empty_o, outs[0], outs[1]]), torch.stack([lses[2], empty_l, *lses[:2]]))
    assert_close(o, whole, torch.float64, "merged out")
    assert_close(l, lse, torch.float64, "merged lse")
    o, l = merge_splits(torch.stack([empty_o, empty_o]), torch.stack([empty_l, empty_l]))
    assert torch.equal(o, empty_o) and torch.isneginf(l).all()


def test_any_mask_and_empty_rows():
    q, k, v = _qkv(4, 400, torch.float64)
    for m in (causal(396), global_tokens(2), decode_window(100, 5), causal(-10)):
        out, lse = split_kv_attention(q, k, v, m, scale=0.25, split=64)
        ro, rl = naive_attention(q, k, v, m.to_dense(4, 400), scale=0.25, return_lse=True)
        assert_close(out, ro, torch.float64, repr(m))
        assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    head = torch.rand(2, 8, 4, 400, generator=torch.Generator().manual_seed(1)) > 0.5   # head-dependent tensor
    from attnkit.masks import as_mask
    out = split_kv_attention(q, k, v, as_mask(head), scale=0.25, split=64)[0]
    assert_close(out, naive_attention(q, k, v, head, scale=0.25), torch.float64, "tensor mask")


def test_strided_cache_layout_and_window_skips_splits():
    q, k, v = _qkv(1, 4096, torch.float32, b=1)
    kh, vh = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    out = decode_attention(q, kh, vh, window=100, sinks=4, split=512)
    assert_close(out, naive_decode_attention(q.double(), k.double(), v.double(), window=100, sinks=4),
                 torch.float32, "heads-first storage")
    text = explain(q, kh, vh, window=100, sinks=4, split=512)
    assert "-> split_kv" in text and "104 of 4096 keys attended" in text


def test_ak_attention_chooses_split_kv_for_decode_shapes():
    """ak.attention's dispatcher takes split-KV for decode shapes (when its compiled kernel runs) and says why."""
    from attnkit.kernels import native
    from attnkit.ops.dense import call as dense

    disp = dense.DISPATCHER
    assert disp.backends[0].name == "split_kv"
    q, k, v = _qkv(2, 2048, torch.float32)
    c = dense.make_call(q, k, v, causal(2046), return_lse=True)
    if native.decode_available():
        assert disp.choose(c).name == "split_kv"
        text = disp.explain(c)
        assert "-> split_kv" in text and "compiled split-KV kernel" in text and "compiled kernel" in text
    out, lse = disp.run(c)
    ro, rl = naive_attention(q.double(), k.double(), v.double(), causal(2046).to_dense(2, 2048), return_lse=True)
    assert_close(out, ro, torch.float32, "out")
    assert_close(lse, rl, torch.float32, "lse")
    prefill = dense.make_call(*_qkv(64, 2048, torch.float32), causal(1984))
    assert disp.choose(prefill).name != "split_kv"
    short = dense.make_call(*_qkv(1, 100, torch.float32))
    assert disp.choose(short).name != "split_kv"
    qg = q.clone().requires_grad_()
    grad = dense.make_call(qg, k, v, causal(2046))
    assert disp.choose(grad).name != "split_kv" and "forward-only" in disp.explain(grad)
    assert disp.choose(dense.make_call(q.double(), k.double(), v.double())).name != "split_kv"


def test_errors():
    q, k, v = _qkv(2, 10, torch.float32)
    with pytest.raises(ValueError, match="offset"):
        decode_attention(q, k, v, offset=9)
    with pytest.raises(ValueError, match="window"):
        decode_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="split_kv"):
        decode_attention(*_qkv(17, 40, torch.float32), backend="split_kv")
    assert decode_allowed(1, 5, window=2, sinks=1).tolist() == [[True, False, False, True, True]]
