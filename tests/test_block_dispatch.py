"""routed_block_attention (key-major dispatch) vs naive masked attention: output and every grad,
with and without autograd (the fused no-grad path and the differentiable path are different code)."""

import math

import pytest
import torch

from attnkit.kernels.dispatch import routed_block_attention
from attnkit.reference.naive_dense import naive_masked_attention
from tolerances import DTYPES, assert_close, compare_fn


def _case(B, N, Nk, Hq, Hkv, D, Dv, bs, diag, seed=0):
    g = torch.Generator().manual_seed(seed)
    ins = {"q": torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64),
           "k": torch.randn(B, Nk, Hkv, D, generator=g, dtype=torch.float64),
           "v": torch.randn(B, Nk, Hkv, Dv, generator=g, dtype=torch.float64)}
    n = math.ceil(Nk / bs)
    sel = torch.rand(B, Hq, N, n, generator=g) < 0.4
    own = torch.arange(N) // bs
    if diag is not None:
        sel[..., torch.arange(N), own] = False
        if diag == "causal":
            sel &= torch.arange(n) < own.unsqueeze(-1)
    keys = torch.arange(Nk)
    allowed = sel[..., keys // bs]  # (B, Hq, N, Nk)
    if diag is not None:
        mine = own.unsqueeze(-1) == (keys // bs)
        if diag == "causal":
            mine &= keys <= torch.arange(N).unsqueeze(-1)
        allowed = allowed | mine
    return ins, sel, allowed


CASES = [
    pytest.param(2, 40, 40, 4, 2, 8, 8, 8, "causal", id="causal-GQA"),
    pytest.param(1, 37, 37, 2, 1, 8, 8, 8, "full", id="full-MQA-ragged"),
    pytest.param(1, 30, 45, 2, 2, 8, 12, 8, None, id="cross-Dv12-ragged-empty-rows"),
    pytest.param(2, 64, 64, 2, 2, 16, 16, 16, "causal", id="causal-b16"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,Nk,Hq,Hkv,D,Dv,bs,diag", CASES)
def test_matches_reference(B, N, Nk, Hq, Hkv, D, Dv, bs, diag, dtype):
    ins, sel, allowed = _case(B, N, Nk, Hq, Hkv, D, Dv, bs, diag)

    def ref(q, k, v):
        return naive_masked_attention(q, k, v, allowed)[0]

    compare_fn(lambda q, k, v: routed_block_attention(q, k, v, sel, bs, diag=diag), ref, ins, dtype)
    with torch.no_grad():  # the fused path (D == Dv) or the matmul path without autograd
        got = routed_block_attention(*(t.to(dtype) for t in ins.values()), sel, bs, diag=diag)
    assert_close(got.double(), ref(**ins), dtype, "no-grad out")


def test_only_diag_and_errors():
    ins, sel, _ = _case(1, 32, 32, 2, 2, 8, 8, 8, "causal")
    sel = torch.zeros_like(sel)
    out = routed_block_attention(*ins.values(), sel, 8, diag="causal")
    mine = (torch.arange(32) // 8).unsqueeze(-1) == (torch.arange(32) // 8)
    torch.testing.assert_close(out, naive_masked_attention(*ins.values(), mine & torch.ones(32, 32).tril().bool())[0])
    assert not routed_block_attention(*ins.values(), sel, 8).any()  # nothing selected: zeros
    with pytest.raises(ValueError, match="diag"):
        routed_block_attention(*ins.values(), sel, 8, diag="x")
    with pytest.raises(ValueError, match="sel"):
        routed_block_attention(*ins.values(), sel[..., :2], 8)
    with pytest.raises(ValueError, match="block_size"):
        routed_block_attention(*ins.values(), sel, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("diag,hq,hkv", [("causal", 4, 2), ("full", 2, 2), (None, 2, 1)])
def test_kernel_path_matches_matmul_path(diag, hq, hkv, dtype):
    """fused=None runs on the compiled tile kernel: output and every gradient equal the float64 matmul path."""
    from attnkit.kernels import native
    from attnkit.kernels.dispatch import dispatch_kernel_reason, routed_block_attention

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    B, N, D, Dv, bs = 2, 192, 16, 8, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, N, hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, hkv, Dv, generator=g, dtype=torch.float64)
    sel = torch.rand(B, hq, N, N // bs, generator=g) < 0.4
    if diag is not None:
        sel &= torch.arange(N // bs) != (torch.arange(N) // bs)[:, None]  # never the own block
    sel[0, 0, :5] = False  # queries with no selected block
    assert dispatch_kernel_reason(q.to(dtype), bs, N) is None
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = routed_block_attention(*ins, sel, bs, diag=diag)
    ref = routed_block_attention(*refs, sel, bs, diag=diag, fused=False)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * go).sum(), ins)
    rgrads = torch.autograd.grad((ref * go).sum(), refs)
    assert_close(out, ref, dtype, "out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(a, b, dtype, name, grad=True)
