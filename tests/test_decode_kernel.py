"""The compiled split-KV decode kernel (kernels/native/decode_cpu.cpp, Lean Attention arXiv 2405.10480) against
the naive decode oracle: masks as key intervals, stream-K partitions of any size, cache layouts, dtypes, NaN."""

from __future__ import annotations

import pytest
import torch

from attnkit.kernels import native
from attnkit.masks import causal
from attnkit.ops.decode import decode_window
from attnkit.ops.decode.split_kv import native_reason, native_split_kv, split_kv_attention
from attnkit.reference.naive_decode import naive_decode_attention
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _kernel():
    if not native.decode_available():
        pytest.skip(f"decode kernel unavailable: {native.decode_status()}")


def _qkv(b, nq, hq, hkv, d, dv, nk, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nq, hq, d, generator=g).to(dtype), torch.randn(b, nk, hkv, d, generator=g).to(dtype),
            torch.randn(b, nk, hkv, dv, generator=g).to(dtype))


CASES = [  # (B, Nq, Hq, Hkv, D, Dv, Nk, offset, window, sinks)
    (2, 1, 8, 2, 128, 128, 1000, None, None, 0),
    (1, 4, 6, 3, 20, 7, 777, 500, 50, 3),        # D, Dv not multiples of 16; rows 12 (padded to 4s)
    (2, 16, 4, 4, 32, 48, 300, 0, None, 0),      # many queries, prefix-causal
    (1, 3, 16, 1, 64, 64, 2048, None, 64, 4),    # MQA, window + sinks: most keys never read
    (1, 2, 2, 1, 16, 16, 64, None, 1, 0),        # window of one key
]


@pytest.mark.parametrize("parts", [1, 3, 1000], ids=lambda p: f"parts{p}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_kernel_matches_naive_any_partition(case, parts):
    """Exact in fp32 whatever the stream-K partition (one part, parts crossing heads, more parts than keys)."""
    b, nq, hq, hkv, d, dv, nk, off, w, s = case
    q, k, v = _qkv(b, nq, hq, hkv, d, dv, nk)
    off = nk - nq if off is None else off
    out, lse = native_split_kv(q, k, v, decode_window(off, w, s), scale=d ** -0.5, parts=parts)
    ro, rl = naive_decode_attention(q.double(), k.double(), v.double(), offset=off, window=w, sinks=s,
                                    return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(out, ro, torch.float32, "out")
    assert_close(lse, rl, torch.float32, "lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_half_precision_caches(dtype):
    q, k, v = _qkv(2, 2, 8, 2, 64, 64, 700, dtype)
    out, lse = native_split_kv(q, k, v, causal(698), scale=0.125, parts=5)
    ro, rl = naive_decode_attention(q.double(), k.double(), v.double(), return_lse=True, scale=0.125)
    assert out.dtype == dtype
    assert_close(out, ro, dtype, "out")
    assert_close(lse, rl, torch.float32, "lse")


def test_cache_layouts_and_strides_agree():
    """Heads-first storage (KVCache), contiguous heads-last, and a strided batch/token view give one result."""
    q, k, v = _qkv(2, 1, 8, 4, 32, 32, 999)
    ref = naive_decode_attention(q.double(), k.double(), v.double())
    hf = (k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2))
    big = torch.randn(2, 2 * 999, 4, 40)
    strided_k, strided_v = big[:, ::2, :, 4:36], big[:, 1::2, :, 8:40]
    strided_k.copy_(k)
    strided_v.copy_(v)
    for kk, vv in ((k, v), hf, (strided_k, strided_v)):
        assert_close(native_split_kv(q, kk, vv, scale=32 ** -0.5, parts=3)[0], ref, torch.float32, "layout")


def test_empty_rows_nan_and_fallback(monkeypatch):
    q, k, v = _qkv(1, 3, 4, 2, 16, 16, 50)
    out, lse = native_split_kv(q, k, v, causal(-2), scale=0.25)    # rows 0, 1 see nothing, row 2 key 0
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2])) and torch.isneginf(lse[:, :2]).all()
    assert_close(out[:, 2:], v[:, :1].repeat_interleave(2, 2), torch.float32, "one key")
    k = k.clone()
    k[0, 10, 1] = float("nan")                                    # KV head 1 only: its query heads 2, 3
    out, _ = native_split_kv(q, k, v, causal(9), scale=0.25)      # rows 1, 2 see key 10, row 0 does not
    assert out[:, 1:, 2:].isnan().all() and not out[:, :, :2].isnan().any() and not out[:, 0].isnan().any()
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    assert "unavailable" in native_reason(q, k, v) and native_split_kv(q, k, v, scale=0.25) is None
    torch_out = split_kv_attention(q, k, v, causal(9), scale=0.25)[0]
    assert torch_out[:, 1:, 2:].isnan().all() and not torch_out[:, :, :2].isnan().any()


def test_fake_twin_and_reasons():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv(1, 2, 8, 2, 16, 24, 40)
    lo, hi = torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), 39)
    with FakeTensorMode() as mode:
        fq, fk, fv, flo, fhi = (mode.from_tensor(t) for t in (q, k, v, lo, hi))
        out, lse = torch.ops.attnkit_decode.decode_fwd(fq, fk, fv, flo, fhi, 0.25, 0)
        assert out.shape == (1, 2, 8, 24) and lse.shape == (1, 2, 8) and lse.dtype == torch.float32
    assert "float64" in native_reason(q.double(), k.double(), v.double())
    assert "forward-only" in native_reason(q.requires_grad_(), k, v)
