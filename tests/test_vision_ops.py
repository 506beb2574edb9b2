"""The vision token-mixer ops (``attnkit.ops.vision``): every fast backend against its naive twin, output and
every gradient in float64 and float32, plus each op's defining identities and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.ops.base import explain
from attnkit.ops.dense.call import attention
from attnkit.ops.local.multi_axis import block_attention
from attnkit.ops.vision import (
    axis_token_mixing,
    channel_gate,
    channel_group_attention,
    dynamic_depthwise_conv,
    focal_modulation,
    global_query_window_attention,
    overlapping_window_attention,
    pool_mixer,
)
from attnkit.reference.naive_vision import (
    naive_axis_token_mixing,
    naive_channel_gate,
    naive_channel_group_attention,
    naive_dynamic_depthwise_conv,
    naive_focal_modulation,
    naive_global_query_window_attention,
    naive_overlapping_window_attention,
    naive_pool_mixer,
)
from tolerances import assert_close, compare_fn

DTYPES = [torch.float64, torch.float32]


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool_size", [1, 3, 5])
def test_pool_mixer_matches_reference(dtype, pool_size):
    compare_fn(lambda x: pool_mixer(x, pool_size), lambda x: naive_pool_mixer(x, pool_size),
               {"x": _r(2, 5, 6, 3)}, dtype)


def test_pool_mixer_identities():
    x = torch.full((2, 5, 4, 3), 2.0, dtype=torch.float64)
    assert torch.equal(pool_mixer(x), torch.zeros_like(x))  # constant -> exactly 0, borders included
    assert pool_mixer(x * 0.85).abs().max() < 1e-15  # (up to the rounding of a mean of 1.7s)
    y = _r(1, 6, 6, 2)
    assert torch.equal(pool_mixer(y, 1), torch.zeros_like(y))
    # interior == depthwise conv with ones/9 - delta; corners divide by 4, edges by 6
    out = pool_mixer(y)
    conv = F.conv2d(y.permute(0, 3, 1, 2), torch.ones(2, 1, 3, 3, dtype=torch.float64) / 9, groups=2, padding=1)
    assert_close(out[:, 1:-1, 1:-1], (conv.permute(0, 2, 3, 1) - y)[:, 1:-1, 1:-1], torch.float64, "interior")
    assert_close(out[:, 0, 0], y[:, :2, :2].sum((1, 2)) / 4 - y[:, 0, 0], torch.float64, "corner")
    assert_close(out[:, 0, 2], y[:, :2, 1:4].sum((1, 2)) / 6 - y[:, 0, 2], torch.float64, "edge")


def _focal_inputs(C=4, L=2):
    return {"q": _r(2, 5, 6, C, seed=1), "ctx": _r(2, 5, 6, C, seed=2), "gates": _r(2, 5, 6, L + 1, seed=3),
            "w0": _r(C, 1, 3, 3, seed=4), "w1": _r(C, 1, 5, 5, seed=5), "hw": _r(C, C, seed=6),
            "hb": _r(C, seed=7)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_focal_modulation_matches_reference(dtype, normalize):
    def fast(q, ctx, gates, w0, w1, hw, hb):
        return focal_modulation(q, ctx, gates, [w0, w1], hw, hb, normalize=normalize)

    def ref(q, ctx, gates, w0, w1, hw, hb):
        return naive_focal_modulation(q, ctx, gates, [w0, w1], hw, hb, normalize)

    compare_fn(fast, ref, _focal_inputs(), dtype)


def test_focal_modulation_identities():
    i = _focal_inputs()
    zero = focal_modulation(i["q"], i["ctx"], torch.zeros_like(i["gates"]), [i["w0"], i["w1"]], i["hw"], i["hb"])
    assert_close(zero, i["q"] * i["hb"], torch.float64, "G = 0 gives q * bias_h")
    # only the global gate open: the modulator is the same at every pixel (q divided out)
    g = torch.zeros_like(i["gates"])
    g[..., -1] = 1
    m = focal_modulation(torch.ones_like(i["q"]), i["ctx"], g, [i["w0"], i["w1"]], i["hw"], None)
    assert m.var(dim=(1, 2)).max() < 1e-20


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
def test_channel_group_attention_matches_reference(dtype, backend):
    i = {"q": _r(2, 12, 3, 4, seed=1), "k": _r(2, 12, 3, 4, seed=2), "v": _r(2, 12, 3, 4, seed=3)}
    compare_fn(lambda q, k, v: channel_group_attention(q, k, v, backend=backend),
               lambda q, k, v: naive_channel_group_attention(q, k, v), i, dtype)


def test_channel_group_attention_is_dense_attention_over_transposed_tokens():
    q, k, v = _r(2, 12, 3, 4, seed=1), _r(2, 12, 3, 4, seed=2), _r(2, 12, 3, 4, seed=3)
    # Cg channel tokens of width P: (B, Cg, G, P) heads-last for ak.attention
    t = [x.permute(0, 3, 2, 1) for x in (q, k, v)]
    dense = attention(*t, scale=4 ** -0.5).permute(0, 3, 2, 1)
    assert_close(channel_group_attention(q, k, v), dense, torch.float64, "transposed dense attention")
    # Cg = 1: A = [1], out = v; any permutation of the pixels permutes the output the same way
    assert_close(channel_group_attention(q[..., :1], k[..., :1], v[..., :1]), v[..., :1], torch.float64, "Cg=1")
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert_close(channel_group_attention(q[:, perm], k[:, perm], v[:, perm]), channel_group_attention(q, k, v)[:, perm],
                 torch.float64, "pixel permutation")


@pytest.mark.parametrize("backend", ["gemm", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_query_window_attention_matches_reference(dtype, backend):
    i = {"qg": _r(2, 2, 2, 2, 3, seed=1), "k": _r(2, 4, 6, 2, 3, seed=2), "v": _r(2, 4, 6, 2, 3, seed=3),
         "bias": _r(2, 4, 4, seed=4)}
    compare_fn(lambda qg, k, v, bias: global_query_window_attention(qg, k, v, 2, bias=bias, backend=backend),
               lambda qg, k, v, bias: naive_global_query_window_attention(qg, k, v, 2, bias), i, dtype)


def test_global_query_identities():
    k, v = _r(2, 4, 4, 2, 3, seed=2), _r(2, 4, 4, 2, 3, seed=3)
    # one window covering the map: cross-attention from the h*w generated tokens
    qg = _r(2, 4, 4, 2, 3, seed=1)
    assert_close(global_query_window_attention(qg, k, v, 4), attention(qg.reshape(2, 16, 2, 3), k.reshape(2, 16, 2, 3),
                 v.reshape(2, 16, 2, 3)).reshape(2, 4, 4, 2, 3), torch.float64, "one window")
    # the window's own queries as global queries: window attention, for the window they come from
    q = _r(2, 4, 4, 2, 3, seed=5)
    out = global_query_window_attention(q[:, :2, :2].contiguous(), k, v, 2)
    assert_close(out[:, :2, :2], block_attention(q, k, v, 2)[:, :2, :2], torch.float64, "own window")
    # images are not mixed: changing image 1 leaves image 0
    k2 = k.clone()
    k2[1] = 0
    assert torch.equal(global_query_window_attention(qg[:, :2, :2].contiguous(), k2, v, 2)[0],
                       global_query_window_attention(qg[:, :2, :2].contiguous(), k, v, 2)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_padded_keys", [False, True])
def test_overlapping_window_attention_matches_reference(dtype, mask_padded_keys):
    i = {"q": _r(2, 4, 6, 2, 3, seed=1), "k": _r(2, 4, 6, 2, 3, seed=2), "v": _r(2, 4, 6, 2, 3, seed=3),
         "bias": _r(2, 4, 16, seed=4)}
    compare_fn(lambda q, k, v, bias: overlapping_window_attention(q, k, v, 2, 4, bias=bias,
                                                                  mask_padded_keys=mask_padded_keys),
               lambda q, k, v, bias: naive_overlapping_window_attention(q, k, v, 2, 4, bias, mask_padded_keys),
               i, dtype)


def test_overlapping_window_without_overlap_is_window_attention():
    q, k, v = _r(2, 4, 6, 2, 3, seed=1), _r(2, 4, 6, 2, 3, seed=2), _r(2, 4, 6, 2, 3, seed=3)
    assert_close(overlapping_window_attention(q, k, v, 2, 2), block_attention(q, k, v, 2), torch.float64, "Mo = M")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["block", "grid"])
def test_axis_token_mixing_matches_reference(dtype, axis):
    i = {"x": _r(2, 4, 6, 3, seed=1), "w": _r(4, 4, seed=2), "b": _r(4, seed=3)}
    compare_fn(lambda x, w, b: axis_token_mixing(x, w, b, 2, axis=axis),
               lambda x, w, b: naive_axis_token_mixing(x, w, b, 2, axis), i, dtype)


def test_axis_token_mixing_identities():
    x = _r(2, 4, 4, 3)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.equal(axis_token_mixing(x, eye, None, 4), x)
    # block with b = Y = X equals grid with g = Y = X: one group, the whole image, raster slots
    w = _r(16, 16, seed=4)
    assert_close(axis_token_mixing(x, w, None, 4), axis_token_mixing(x, w, None, 4, axis="grid"), torch.float64, "b=g")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dynamic_depthwise_conv_matches_reference(dtype):
    i = {"x": _r(2, 5, 4, 6, seed=1), "kern": _r(2, 5, 4, 3, 9, seed=2)}
    compare_fn(lambda x, kern: dynamic_depthwise_conv(x, kern, 3),
               lambda x, kern: naive_dynamic_depthwise_conv(x, kern, 3), i, dtype)


def test_dynamic_depthwise_conv_with_constant_kernels_is_a_depthwise_conv():
    x, w = _r(2, 5, 4, 6, seed=1), _r(3, 9, seed=2)
    kern = w.expand(2, 5, 4, 3, 9)
    conv = F.conv2d(x.permute(0, 3, 1, 2), w.repeat_interleave(2, 0).view(6, 1, 3, 3), padding=1, groups=6)
    assert_close(dynamic_depthwise_conv(x, kern, 3), conv.permute(0, 2, 3, 1), torch.float64, "constant kernels")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_gate_matches_reference(dtype):
    i = {"y": _r(2, 3, 4, 6, seed=1), "w1": _r(2, 6, seed=2), "b1": _r(2, seed=3), "w2": _r(6, 2, seed=4),
         "b2": _r(6, seed=5)}
    compare_fn(channel_gate, naive_channel_gate, i, dtype)


def test_clear_errors_and_explain():
    x = _r(1, 4, 4, 2)
    with pytest.raises(ValueError, match="pool_mixer: pool_size must be odd"):
        pool_mixer(x, 2)
    with pytest.raises(ValueError, match=r"pool_mixer: x must be \(B, Y, X, C\)"):
        pool_mixer(x[0])
    q = _r(1, 3, 4, 2, 3)
    with pytest.raises(ValueError, match=r"overlapping_window_attention: the map .* multiple of window_size 2"):
        overlapping_window_attention(q, q, q, 2, 4)
    with pytest.raises(ValueError, match="overlapping_window_attention: overlap_size must be >= window_size"):
        overlapping_window_attention(q, q, q, 1, 2)
    with pytest.raises(ValueError, match="dynamic_depthwise_conv: the channel count C=2 must be divisible"):
        dynamic_depthwise_conv(x, _r(1, 4, 4, 3, 9), 3)
    with pytest.raises(ValueError, match="axis_token_mixing: the map"):
        axis_token_mixing(_r(1, 3, 4, 2), _r(4, 4), None, 2)
    with pytest.raises(ValueError, match=r"unknown backend .sdpa."):
        pool_mixer(x, backend="sdpa")
    text = explain("channel_group_attention", *(_r(1, 8, 2, 4, seed=s) for s in range(3)))
    assert "-> matmul" in text and "reference" in text
    assert "-> avg_pool" in explain("pool_mixer", x, None, None)
