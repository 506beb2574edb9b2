"""BiFormer bi-level routing attention vs its naive raster-order reference, and identities."""

import pytest
import torch

from attnkit.mechanisms.biformer import BiLevelRoutingAttention
from attnkit.ops.routed.biformer import bi_level_routing_attention
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_routed import naive_biformer
from tolerances import DTYPES, compare_fn


def _ins(B=2, Y=8, X=12, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, Y, X, H, D, generator=g, dtype=torch.float64) for n in "qkv"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bra_matches_reference(dtype):
    def ref(q, k, v):  # route on the inputs as the fast path sees them (half rounding can change routes)
        rq, rk = (t.detach().to(dtype).double() for t in (q, k))
        return naive_biformer(q, k, v, 4, 3, route_q=rq, route_k=rk)

    compare_fn(lambda q, k, v: bi_level_routing_attention(q, k, v, 4, 3), ref, _ins(), dtype)


def test_bra_identities():
    q, k, v = _ins().values()
    B, Y, X, H, D = q.shape
    flat = [t.reshape(B, Y * X, H, D) for t in (q, k, v)]
    dense = naive_masked_attention(*flat, scale=(H * D) ** -0.5)[0].view(B, Y, X, H, D)
    torch.testing.assert_close(bi_level_routing_attention(q, k, v, 4, 16), dense)  # topk = R
    torch.testing.assert_close(bi_level_routing_attention(q, k, v, 1, 1), dense)  # S = 1
    const = torch.ones(1, 4, 4, 1, 2, dtype=torch.float64)  # all affinities tie: lowest regions win
    _, lay = bi_level_routing_attention(const, const, const, 2, 2, return_layout=True)
    assert lay[0, 0, :, :2].all() and not lay[0, 0, :, 2:].any()


def test_bra_module_and_errors():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(8, 2, n_win=2, topk=2).double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: m(x), (x,), fast_mode=True)
    q, k, v = _ins().values()
    with pytest.raises(ValueError, match="n_win"):
        bi_level_routing_attention(q, k, v, 3, 1)
    with pytest.raises(ValueError, match="topk"):
        bi_level_routing_attention(q, k, v, 4, 17)
