"""block_gather_attention vs the naive expanded-layout reference: output, lse, every grad."""

import pytest
import torch

from attnkit.kernels.gather import block_gather_attention
from attnkit.reference.naive_dense import causal_dense, naive_masked_attention
from attnkit.reference.naive_routed import naive_block_sparse_attention
from tolerances import DTYPES, compare_fn


class Causal:
    """Stand-in with the mask_mod protocol (ak.masks.causal() has the same semantics)."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx


def _inputs(B, Nq, Nk, Hq, Hkv, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(B, Nq, Hq, D, generator=g, dtype=torch.float64),
        "k": torch.randn(B, Nk, Hkv, D, generator=g, dtype=torch.float64),
        "v": torch.randn(B, Nk, Hkv, Dv, generator=g, dtype=torch.float64),
    }


def _layout(shape, density, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


CASES = [
    # B, Nq, Nk, Hq, Hkv, D, Dv, block, layout leading dims, causal
    pytest.param(2, 64, 64, 4, 4, 16, 16, 16, (2, 4), False, id="B2-N64-H4-b16-perBH"),
    pytest.param(1, 70, 50, 4, 2, 8, 12, (16, 8), (1, 4), False, id="ragged-GQA-bq16-bk8-Dv12"),
    pytest.param(2, 48, 48, 2, 1, 8, 8, 8, (2, 1), True, id="MQA-causal-perB"),
    pytest.param(1, 33, 33, 2, 2, 8, 8, 8, (), True, id="2D-layout-causal-ragged"),
]


@pytest.mark.parametrize("lse", [True, False], ids=["explicit+lse", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Nq,Nk,Hq,Hkv,D,Dv,block,lead,causal", CASES)
def test_matches_reference(B, Nq, Nk, Hq, Hkv, D, Dv, block, lead, causal, dtype, lse):
    bq, bk = (block, block) if isinstance(block, int) else block
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    layout = _layout((*lead, nqb, nkb), 0.5)
    if lead:
        layout[..., 0, :] = False  # one fully empty query block: zero rows, -inf lse
    extra = Causal() if causal else None
    dense_extra = causal_dense(Nq, Nk) if causal else None

    def fast(q, k, v):
        return block_gather_attention(q, k, v, layout, block, extra_mask=extra, return_lse=lse)

    def ref(q, k, v):
        out = naive_block_sparse_attention(q, k, v, layout, block, dense_extra)
        return out if lse else out[0]

    compare_fn(fast, ref, _inputs(B, Nq, Nk, Hq, Hkv, D, Dv), dtype, lse_at=(1,) if lse else ())


def test_empty_rows_are_zero_with_zero_grad():
    x = _inputs(1, 32, 32, 2, 2, 8, 8)
    q, k, v = (t.clone().requires_grad_() for t in x.values())
    layout = torch.zeros(2, 2, dtype=torch.bool)
    layout[1, 1] = True
    out, lse = block_gather_attention(q, k, v, layout, 16, return_lse=True)
    fused = block_gather_attention(q, k, v, layout, 16)
    assert torch.isinf(lse[:, :16]).all() and torch.isfinite(lse[:, 16:]).all()
    for o in (out, fused):
        assert torch.equal(o[:, :16], torch.zeros_like(o[:, :16]))
        q.grad = k.grad = None
        o.sum().backward()
        assert torch.isfinite(q.grad).all() and q.grad[:, :16].abs().max() == 0
        assert k.grad[:, :16].abs().max() == 0


def test_full_layout_equals_dense_and_gradcheck():
    x = _inputs(1, 12, 12, 2, 1, 4, 3)
    layout = torch.ones(3, 3, dtype=torch.bool)
    out = block_gather_attention(*x.values(), layout, 4, extra_mask=Causal())
    ref, _ = naive_masked_attention(*x.values(), causal_dense(12, 12))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    lay = _layout((1, 2, 3, 3), 0.6, seed=3)
    ins = tuple(t.clone().requires_grad_() for t in x.values())
    def fn(q, k, v):
        out, lse = block_gather_attention(q, k, v, lay, 4, extra_mask=Causal(), return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)  # empty rows: lse -inf, no derivative

    torch.autograd.gradcheck(fn, ins, fast_mode=True)
    torch.autograd.gradcheck(lambda q, k, v: block_gather_attention(q, k, v, lay, 4, extra_mask=Causal()), ins,
                             fast_mode=True)


def test_chunking_is_invisible(monkeypatch):
    from attnkit.kernels import alloc

    x = _inputs(1, 64, 64, 2, 2, 8, 8)
    layout = _layout((1, 2, 8, 8), 0.4)
    for lse in (True, False):
        monkeypatch.setattr(alloc, "CHUNK_BYTES", 2**30)
        whole = block_gather_attention(*x.values(), layout, 8, extra_mask=Causal(), return_lse=lse)
        monkeypatch.setattr(alloc, "CHUNK_BYTES", 1)  # one query block per chunk
        parts = block_gather_attention(*x.values(), layout, 8, extra_mask=Causal(), return_lse=lse)
        torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
    x = _inputs(1, 32, 32, 2, 2, 8, 8)
    q, k, v = x.values()
    with pytest.raises(ValueError, match="layout has"):
        block_gather_attention(q, k, v, torch.ones(3, 4, dtype=torch.bool), 8)
    with pytest.raises(TypeError, match="bool"):
        block_gather_attention(q, k, v, torch.ones(4, 4), 8)
    with pytest.raises(ValueError, match="leading dims"):
        block_gather_attention(q, k, v, torch.ones(3, 2, 4, 4, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="block_size"):
        block_gather_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool), 0)
    with pytest.raises(TypeError, match="extra_mask"):
        block_gather_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool), 8, extra_mask=lambda *a: True)


KERNEL_CASES = [
    # B, Nq, Nk, Hq, Hkv, D, Dv, block, layout leading dims, causal (ak.masks.causal(): the tile kernel takes it)
    pytest.param(2, 200, 200, 4, 4, 16, 16, 64, (2, 4), True, id="perBH-causal-ragged"),
    pytest.param(1, 256, 160, 4, 2, 8, 12, (128, 32), (1, 4), False, id="GQA-perHead-bq128-bk32-Dv12"),
    pytest.param(2, 96, 96, 2, 1, 8, 8, 48, (2, 1), True, id="MQA-causal-block48"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Nq,Nk,Hq,Hkv,D,Dv,block,lead,causal", KERNEL_CASES)
def test_kernel_path_matches_reference(B, Nq, Nk, Hq, Hkv, D, Dv, block, lead, causal, dtype):
    """Layouts with 16-multiple key blocks run on the compiled tile kernel: output, lse, every grad."""
    from attnkit.kernels import native
    from attnkit.kernels.gather import gather_path
    from attnkit.masks import causal as causal_mask

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    bq, bk = (block, block) if isinstance(block, int) else block
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    layout = _layout((*lead, nqb, nkb), 0.5)
    layout[..., 0, :] = False  # one fully empty query block: zero rows, -inf lse
    extra = causal_mask() if causal else None
    q = torch.randn(B, Nq, Hq, D, dtype=dtype)
    assert "compiled tile kernel" in gather_path(q, torch.randn(B, Nk, Hkv, D), layout, block, extra)
    dense_extra = causal_dense(Nq, Nk) if causal else None

    def fast(q, k, v):
        return block_gather_attention(q, k, v, layout, block, extra_mask=extra, return_lse=True)

    def ref(q, k, v):
        return naive_block_sparse_attention(q, k, v, layout, block, dense_extra)

    compare_fn(fast, ref, _inputs(B, Nq, Nk, Hq, Hkv, D, Dv), dtype, lse_at=(1,))


def test_kernel_path_falls_back(monkeypatch):
    """float64, unaligned key blocks and mask_mod-only element masks keep the gather path (and say why)."""
    from attnkit.kernels.gather import gather_path

    lay = torch.ones(2, 2, dtype=torch.bool)
    q = torch.randn(1, 64, 2, 8)
    assert "tile kernel not used: torch.float64" in gather_path(q.double(), q, lay, 32)
    assert "tile kernel not used: key block 24 is not a multiple of 16" in gather_path(q, q, torch.ones(3, 3).bool(),
                                                                                          (32, 24))
    assert "tile kernel not used: element mask Causal" in gather_path(q, q, lay, 32, Causal())
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    assert "ATTNKIT_NATIVE=0" in gather_path(q, q, lay, 32)
    out = block_gather_attention(q, q, q, lay, 32)
    monkeypatch.delenv("ATTNKIT_NATIVE")
    torch.testing.assert_close(out, block_gather_attention(q, q, q, lay, 32), atol=1e-5, rtol=1e-5)
