"""MoBA vs its naive per-query reference, and the paper's identities."""

import pytest
import torch

from attnkit.mechanisms.moba import MoBA
from attnkit.ops.routed.moba import moba_attention
from attnkit.reference.naive_dense import causal_dense, naive_masked_attention
from attnkit.reference.naive_routed import naive_moba, naive_moba_mask
from tolerances import DTYPES, assert_close, compare_fn


def _ins(B=1, N=40, Hq=4, Hkv=2, D=8, Nk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Nk = Nk or N
    return {"q": torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64),
            "k": torch.randn(B, Nk, Hkv, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, Nk, Hkv, D, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("routing,causal", [("token", True), ("block", True), ("token", False), ("block", False)])
def test_moba_matches_reference(routing, causal, dtype):
    ins = _ins(B=2)  # N=40, block 8 -> 5 blocks, the routing is not trivial with topk=3

    def ref(q, k, v):  # route on the inputs as the fast path sees them (half rounding changes routes)
        qr, kr = (t.detach().to(dtype).double() for t in (q, k))
        return naive_masked_attention(q, k, v, naive_moba_mask(qr, kr, 8, 3, causal, routing))[0]

    compare_fn(lambda q, k, v: moba_attention(q, k, v, 8, 3, causal=causal, routing=routing), ref, ins, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("topk", [1, 3, 5])
def test_moba_block_routing_inference_matches_reference(topk, causal, dtype):
    """Without autograd, block routing runs on the fused op (own block + gathered past blocks, merged by
    log-sum-exp; query blocks grouped by their count of past blocks); GQA 4:2, B=2."""
    ins = _ins(B=2)
    q, k, v = (ins[n].to(dtype) for n in "qkv")
    ref = naive_masked_attention(*(t.double() for t in (q, k, v)),
                                 naive_moba_mask(q.double(), k.double(), 8, topk, causal, "block"))[0]
    with torch.no_grad():
        out = moba_attention(q, k, v, 8, topk, causal=causal, routing="block", backend="fused")
    assert_close(out.double(), ref, dtype, "out")


def test_moba_cross_noncausal_matches_reference():
    ins = _ins(N=20, Nk=36)
    out = moba_attention(*ins.values(), 8, 2, causal=False)
    torch.testing.assert_close(out, naive_moba(*ins.values(), 8, 2, causal=False))


@pytest.mark.parametrize("routing", ["token", "block"])
def test_moba_identities(routing):
    ins = _ins(N=37)  # ragged last block
    q, k, v = ins.values()
    dense_c, _ = naive_masked_attention(q, k, v, causal_dense(37, 37))
    torch.testing.assert_close(moba_attention(q, k, v, 8, 5, routing=routing), dense_c)  # topk = all blocks
    torch.testing.assert_close(moba_attention(q, k, v, 64, 1, routing=routing), dense_c)  # one block
    blockdiag = causal_dense(37, 37) & (torch.arange(37)[:, None] // 8 == torch.arange(37)[None] // 8)
    torch.testing.assert_close(moba_attention(q, k, v, 8, 1, routing=routing),
                               naive_masked_attention(q, k, v, blockdiag)[0])
    dense, _ = naive_masked_attention(q, k, v)
    torch.testing.assert_close(moba_attention(q, k, v, 8, 5, causal=False, routing=routing), dense)


def test_moba_token_topk_oracle_and_counts():
    # block size 1: every query sees itself plus its topk-1 past tokens with the largest q·k
    q, k, v = _ins(N=12, Hq=2, Hkv=2).values()
    _, sel = moba_attention(q, k, v, 1, 3, return_layout=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~causal_dense(12, 12), float("-inf"))
    for t in range(12):
        past = s[0, :, t, :t]
        want = min(2, t)
        assert (sel[0, :, t].sum(-1) == 1 + want).all() and sel[0, :, t, t].all()
        if want:
            top = past.topk(want, dim=-1).indices
            assert torch.gather(sel[0, :, t, :t], -1, top).all()


def test_moba_module_gradcheck_and_errors():
    torch.manual_seed(0)
    m = MoBA(8, 2, block_size=4, topk=2, causal=True).double()
    torch.autograd.gradcheck(lambda x: m(x), (torch.randn(1, 12, 8, dtype=torch.float64, requires_grad=True),),
                             fast_mode=True)
    q, k, v = _ins(N=32).values()
    with pytest.raises(ValueError, match="topk must be in"):
        moba_attention(q, k, v, 8, 5)
    with pytest.raises(ValueError, match="block_size"):
        moba_attention(q, k, v, 0, 1)
    with pytest.raises(ValueError, match="routing"):
        moba_attention(q, k, v, 8, 2, routing="x")
    with pytest.raises(ValueError, match="causal MoBA"):
        moba_attention(q, k[:, :16], v[:, :16], 8, 1)
