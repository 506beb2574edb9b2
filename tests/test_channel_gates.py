"""ECA, ELA and LKA (``ops/channel``, ``mechanisms/channel_*``): ops vs their naive references (output and every
gradient), each paper's identities, clear errors, and weight compatibility with timm's EcaModule and
EfficientLocalAttn (output and input gradient)."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.ops.channel import eca_attention, eca_kernel_size, ela_attention, large_kernel_attention
from attnkit.reference.naive_channel import naive_eca_attention, naive_ela_attention, naive_lka_attention
from peers import import_timm
from tolerances import assert_close, compare_fn

G = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ ECA


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_eca_op_matches_reference(dtype):
    inputs = {"x": _r(2, 9, 4, 5), "weight": _r(5), "bias": _r(1)}
    compare_fn(lambda **a: eca_attention(**a), lambda **a: naive_eca_attention(**a), inputs, dtype)


def test_eca_kernel_size_table():
    """arXiv 1910.03151 Eq. 12 with gamma = 2, b = 1 (ties upward, as the authors' code)."""
    got = [eca_kernel_size(c) for c in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)]
    assert got == [1, 3, 3, 3, 3, 5, 5, 5, 5, 7]
    assert eca_kernel_size(4, minimum=3) == 3
    assert ak.get("eca", channels=256).kernel_size == 5


def test_eca_k1_zero_bias_is_a_sigmoid_gate_of_the_channel_mean():
    x, w = _r(2, 6, 3, 4), _r(1)
    out = eca_attention(x, w, torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(out, x * torch.sigmoid(w * x.mean((2, 3)))[:, :, None, None])


def test_eca_zero_kernel_halves_and_gate_ignores_zero_mean_patterns():
    x = _r(2, 8, 5, 5)
    torch.testing.assert_close(eca_attention(x, torch.zeros(3, dtype=torch.float64)), x / 2)
    w = _r(3)
    pattern = _r(2, 8, 5, 5)
    pattern = pattern - pattern.mean((2, 3), keepdim=True)
    gate = eca_attention(x, w) / x
    torch.testing.assert_close(eca_attention(x + pattern, w) / (x + pattern), gate)


def test_eca_is_a_banded_toeplitz_matrix_on_the_means():
    x, w = _r(1, 7, 2, 3), _r(3)
    M = sum(torch.diag(w[j].expand(7 - abs(j - 1)), j - 1) for j in range(3))  # z_c = sum_j w_j y_{c+j-1}
    z = M @ x.mean((2, 3))[0]
    torch.testing.assert_close(eca_attention(x, w)[0], x[0] * torch.sigmoid(z)[:, None, None])


def test_eca_errors():
    with pytest.raises(ValueError, match=r"eca_attention: the kernel size must be odd"):
        eca_attention(torch.randn(1, 4, 2, 2), torch.randn(2))
    with pytest.raises(ValueError, match=r"eca_attention: x must be \(B, C, H, W\)"):
        eca_attention(torch.randn(4, 2, 2), torch.randn(3))
    with pytest.raises(ValueError, match=r"EfficientChannelAttention: kernel_size must be odd"):
        ak.get("eca", channels=8, kernel_size=4)
    with pytest.raises(ValueError, match=r"EfficientChannelAttention: x must be \(B, C=8, H, W\)"):
        ak.get("eca", channels=8)(torch.randn(1, 8, 8))


@pytest.mark.parametrize("name", ["eca", "ela", "lka"])
def test_channels_last_input_is_named(name):
    m = ak.get(name, channels=32)
    with pytest.raises(ValueError, match=r"x must be channels-first \(B, C=32, H, W\), got shape \(2, 5, 6, 32\), "
                                         r"which looks channels-last"):
        m(torch.randn(2, 5, 6, 32))


@pytest.mark.parametrize(("channels", "kwargs"), [(64, {}), (4, {}), (None, {"kernel_size": 5})])
def test_eca_from_timm(channels, kwargs):
    timm = import_timm()
    torch.manual_seed(0)
    peer = timm.layers.EcaModule(channels, **kwargs)
    m = ak.info("eca").module.from_timm(peer)
    x = torch.randn(2, channels or 24, 7, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_peer, y = peer(x), m(x2)
    assert_close(y, y_peer, torch.float32, "out")
    g = torch.randn_like(y)
    (gp,), (ga,) = torch.autograd.grad(y_peer, x, g), torch.autograd.grad(y, x2, g)
    assert_close(ga, gp, torch.float32, "dx", grad=True)
    (dw_peer,), (dw,) = torch.autograd.grad(peer(x).sum(), peer.conv.weight), torch.autograd.grad(m(x2).sum(), m.weight)
    assert_close(dw, dw_peer.reshape(-1), torch.float32, "dweight", grad=True)


def test_eca_from_timm_refuses_the_mlp_experiment():
    timm = import_timm()
    with pytest.raises(ValueError, match=r"from_timm: expected an EcaModule without use_mlp"):
        ak.info("eca").module.from_timm(timm.layers.EcaModule(64, use_mlp=True))


# ------------------------------------------------------------------------------------------------ ELA


def _ela_inputs(C=16, k=5, gc=8, shared=True):
    d = {"x": _r(2, C, 5, 3), "weight": _r(C, gc, k), "bias": _r(C), "norm_weight": 1 + 0.1 * _r(C),
         "norm_bias": 0.1 * _r(C)}
    if not shared:
        d.update(weight_w=_r(C, gc, k), bias_w=_r(C), norm_weight_w=1 + 0.1 * _r(C), norm_bias_w=0.1 * _r(C))
    return d


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_ela_op_matches_reference(dtype, shared):
    inputs = _ela_inputs(shared=shared)
    kw = {"groups": 2, "norm_groups": 4, "act": "silu" if not shared else "none"}

    def fast(**a):
        return ela_attention(a.pop("x"), a.pop("weight"), a.pop("bias"), **a, **kw)

    def ref(**a):
        return naive_ela_attention(a["x"], a["weight"], a["bias"], kw["groups"], kw["norm_groups"], a["norm_weight"],
                                   a["norm_bias"], 1e-5, kw["act"], a.get("weight_w"), a.get("bias_w"),
                                   a.get("norm_weight_w"), a.get("norm_bias_w"))
    compare_fn(fast, ref, inputs, dtype)


def test_ela_square_maps_take_the_batched_path_and_agree():
    x = _r(2, 16, 6, 6)
    a = _ela_inputs()
    kw = {"groups": 16, "norm_groups": 16, "norm_weight": a["norm_weight"], "norm_bias": a["norm_bias"]}
    w = _r(16, 1, 7)
    torch.testing.assert_close(ela_attention(x, w, **kw),
                               naive_ela_attention(x, w, None, 16, 16, a["norm_weight"], a["norm_bias"], 1e-5, "none"))


def test_ela_identities():
    m = ak.get("ela", channels=32, variant="T").double()
    x = _r(2, 32, 5, 7)
    with torch.no_grad():
        m.weight.zero_()  # F = 0 -> GN output = beta = 0 -> both gates 0.5
        torch.testing.assert_close(m(x), x / 4)
    m = ak.get("ela", channels=32, variant="L").double()
    with torch.no_grad():
        m.norm_bias.normal_()
        y = m(x)
        # weight sharing: transposing the map transposes the output
        torch.testing.assert_close(m(x.transpose(-1, -2)), y.transpose(-1, -2))
        # rank-1 gate: out / x = y_h[b, c, h] * y_w[b, c, w]
        ratio = y / x
        rank1 = ratio[..., :, :1] * ratio[..., :1, :] / ratio[..., :1, :1]
        torch.testing.assert_close(ratio, rank1)


def test_ela_variant_parameter_counts():
    """arXiv 2403.01123's variants at C = 256: T 1,792, B 2,304, S 10,752, L 14,848 parameters."""
    counts = {v: sum(p.numel() for p in ak.get("ela", channels=256, variant=v).parameters()) for v in "TBSL"}
    assert counts == {"T": 1792, "B": 2304, "S": 10752, "L": 14848}


def test_ela_errors():
    with pytest.raises(ValueError, match=r"EfficientLocalAttention: group_channels \(8\) must divide channels \(12\)"):
        ak.get("ela", channels=12, variant="S", norm_groups=4)
    with pytest.raises(ValueError, match=r"EfficientLocalAttention: norm_groups \(16\) must divide channels \(24\)"):
        ak.get("ela", channels=24)
    with pytest.raises(ValueError, match=r"ela_attention: groups \(3\) must be a positive divisor"):
        ela_attention(torch.randn(1, 8, 4, 4), torch.randn(8, 1, 3), groups=3)
    with pytest.raises(ValueError, match=r"EfficientLocalAttention: variant must be one of"):
        ak.get("ela", channels=32, variant="X")


@pytest.mark.parametrize("kwargs", [{}, {"bias": True, "has_skip": True}, {"norm_layer": None, "kernel_size": 5}])
def test_ela_from_timm(kwargs):
    timm = import_timm()
    from timm.layers.coord_attn import EfficientLocalAttn

    torch.manual_seed(0)
    peer = EfficientLocalAttn(32, **kwargs)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert timm is not None
    m = ak.info("ela").module.from_timm(peer)
    x = torch.randn(2, 32, 9, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_peer, y = peer(x), m(x2)
    assert_close(y, y_peer, torch.float32, "out")
    g = torch.randn_like(y)
    (gp,), (ga,) = torch.autograd.grad(y_peer, x, g), torch.autograd.grad(y, x2, g)
    assert_close(ga, gp, torch.float32, "dx", grad=True)


# ------------------------------------------------------------------------------------------------ LKA


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_lka_op_matches_reference(dtype):
    C = 3
    inputs = {"x": _r(1, C, 6, 5), "dw_weight": _r(C, 1, 3, 3), "dw_bias": _r(C), "dil_weight": _r(C, 1, 3, 3),
              "dil_bias": _r(C), "pw_weight": _r(C, C, 1, 1), "pw_bias": _r(C)}
    compare_fn(lambda **a: large_kernel_attention(**a, dilation=2),
               lambda **a: naive_lka_attention(**a, dilation=2), inputs, dtype)


def test_lka_delta_kernels_square_the_input_and_receptive_field_is_23x23():
    m = ak.get("lka", channels=2).double()
    with torch.no_grad():
        for conv in (m.conv0, m.conv_spatial):
            conv.weight.zero_()
            conv.weight[:, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1
            conv.bias.zero_()
        m.conv1.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        m.conv1.bias.zero_()
    x = _r(1, 2, 5, 6)
    torch.testing.assert_close(m(x), x * x)
    m = ak.get("lka", channels=2).double()
    x = _r(1, 2, 31, 31).requires_grad_()
    (g,) = torch.autograd.grad(m(x)[0, :, 15, 15].sum(), x)
    support = g.abs().sum(1)[0] > 0
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 26, 4, 26)  # 23 x 23 around (15, 15)
