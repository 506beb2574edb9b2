"""Local-attention modules: NA 1/2/3-D, DiNAT stacks, HaloNet, MaxViT multi-axis, CCNet criss-cross.

Each functional core is checked against ak.neighborhood_attention / ak.attention with the
pattern's mask (block(P) = NA(k=P, s=P), grid(G) = NA(k=G, dilation=Y/G), ...), and the modules against their
functional cores.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.mechanisms.criss_cross import CrissCrossAttention
from attnkit.mechanisms.halo import HaloAttention
from attnkit.mechanisms.maxvit import MultiAxisAttention
from attnkit.mechanisms.neighborhood import (
    DilatedNeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from attnkit.ops.local.criss_cross import criss_cross_attention
from attnkit.ops.local.halo import halo_attention
from attnkit.ops.local.multi_axis import block_attention, grid_attention, relative_bias


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _qkv(*shape):
    return tuple(_rand(*shape, seed=i) for i in range(3))


# ---------------------------------------------------------------- neighborhood modules
@pytest.mark.parametrize("cls,shape,kw", [
    (NeighborhoodAttention1D, (20,), dict(kernel_size=5, is_causal=True)),
    (NeighborhoodAttention2D, (7, 9), dict(kernel_size=(3, 5), dilation=(2, 1))),
    (NeighborhoodAttention3D, (4, 5, 6), dict(kernel_size=3, stride=(1, 2, 3))),
])
def test_na_modules_match_functional(cls, shape, kw):
    torch.manual_seed(0)
    m = cls(16, 2, **kw).double()
    x = _rand(2, *shape, 16)
    qkv = m.qkv(x).view(2, *shape, 3, 2, 8)
    q, k, v = qkv.unbind(-3)
    ref = m.proj(ak.neighborhood_attention(q, k, v, backend="reference", **kw).reshape(2, *shape, 16))
    torch.testing.assert_close(m(x), ref)
    assert "kernel_size" in repr(m)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: x must be \(B, .*C=16\), got shape"):
        m(_rand(2, 16, *shape))


def test_dilated_stack_is_a_config_of_na():
    m = DilatedNeighborhoodAttention(16, 2, 3, dilations=(1, "auto", 2)).double()
    assert m.resolve((12, 9)) == [(1, 1), (4, 3), (2, 2)]
    x = _rand(1, 12, 9, 16)
    y = x
    for layer, norm, d in zip(m.layers, m.norms, m.resolve((12, 9))):
        y = y + layer(norm(y), dilation=d)
    torch.testing.assert_close(m(x), y)
    assert all(type(layer) is NeighborhoodAttention2D for layer in m.layers)


# ---------------------------------------------------------------- HaloNet
def test_halo_zero_halo_is_blocked_neighborhood():
    q, k, v = _qkv(2, 8, 12, 2, 4)
    torch.testing.assert_close(halo_attention(q, k, v, 4, 0), ak.neighborhood_attention(q, k, v, 4, stride=4))


def test_halo_interior_blocks_equal_gna():
    b, h = 4, 2
    q, k, v = _qkv(1, 16, 16, 2, 4)
    out = halo_attention(q, k, v, b, h)
    gna = ak.neighborhood_attention(q, k, v, b + 2 * h, stride=b)
    torch.testing.assert_close(out[:, 4:12, 4:12], gna[:, 4:12, 4:12])  # blocks whose halo is inside the image
    assert not torch.allclose(out[:, :4, :4], gna[:, :4, :4])  # borders differ: HaloNet shrinks, GNA shifts


def test_halo_relative_terms_and_padding_conventions():
    b, h, D = 2, 1, 4
    q, k, v = _qkv(1, 4, 4, 1, D)
    rh, rw = _rand(2 * (b + h) - 1, D, seed=5), _rand(2 * (b + h) - 1, D, seed=6)
    out = halo_attention(q, k, v, b, h, rel_h=rh, rel_w=rw, mask_padding=False)
    # loop reference: every query of block (r, c) over its padded window, zero keys/values outside
    W = b + 2 * h
    ref = torch.zeros_like(out)
    for y in range(4):
        for x in range(4):
            r0, c0 = (y // b) * b - h, (x // b) * b - h
            logits, vals = [], []
            for yy in range(r0, r0 + W):
                for xx in range(c0, c0 + W):
                    inside = 0 <= yy < 4 and 0 <= xx < 4
                    kk = k[0, yy, xx, 0] if inside else torch.zeros(D, dtype=q.dtype)
                    vals.append(v[0, yy, xx, 0] if inside else torch.zeros(D, dtype=q.dtype))
                    qq = q[0, y, x, 0]
                    logits.append(qq @ kk * D ** -0.5 + qq @ rh[yy - y + b + h - 1] + qq @ rw[xx - x + b + h - 1])
            ref[0, y, x, 0] = torch.softmax(torch.stack(logits), 0) @ torch.stack(vals)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="multiple"):
        halo_attention(q[:, :3], k[:, :3], v[:, :3], 2, 1)


def test_halo_module_shapes_and_grad():
    m = HaloAttention(16, 2, block_size=4, halo_size=1)
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad.shape == x.shape and m.rel_h.grad.abs().sum() > 0


# ---------------------------------------------------------------- MaxViT
def test_maxvit_block_and_grid_are_neighborhood_patterns():
    q, k, v = _qkv(2, 12, 12, 2, 4)
    torch.testing.assert_close(block_attention(q, k, v, 4), ak.neighborhood_attention(q, k, v, 4, stride=4))
    torch.testing.assert_close(grid_attention(q, k, v, 3), ak.neighborhood_attention(q, k, v, 3, dilation=4))
    torch.testing.assert_close(grid_attention(q, k, v, 12), ak.neighborhood_attention(q, k, v, 12))  # global


def test_maxvit_bias_and_module():
    q, k, v = _qkv(1, 4, 4, 2, 4)
    table = _rand(9, 2, seed=9)
    bias = relative_bias(table, 2)  # (H, 4, 4)
    assert bias.shape == (2, 4, 4) and torch.equal(bias[:, 0, 3], table[0])  # offset (-1, -1) -> row 0
    out = block_attention(q, k, v, 2, bias=bias)
    # window (0, 0) of head 0 by hand
    toks = [(0, 0), (0, 1), (1, 0), (1, 1)]
    s = torch.stack([torch.stack([q[0, a[0], a[1], 0] @ k[0, b[0], b[1], 0] * 0.5 for b in toks])
                     for a in toks]) + bias[0]
    ref = torch.softmax(s, -1) @ torch.stack([v[0, b[0], b[1], 0] for b in toks])
    torch.testing.assert_close(out[0, :2, :2, 0].reshape(4, 4), ref)
    m = MultiAxisAttention(16, 2, block_size=4, grid_size=2)
    assert m(torch.randn(1, 8, 8, 16)).shape == (1, 8, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        block_attention(q[:, :3], k[:, :3], v[:, :3], 2)


# ---------------------------------------------------------------- CCNet
def _criss_cross_mask(Y, X):
    yy, xx = torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    return (yy[:, None] == yy[None, :]) | (xx[:, None] == xx[None, :])


def test_criss_cross_matches_masked_dense_attention():
    q, k, v = _qkv(2, 5, 6, 2, 4)
    out = criss_cross_attention(q, k, v)
    mask = _criss_cross_mask(5, 6)
    assert (mask.sum(1) == 5 + 6 - 1).all()  # centre counted once
    ref = ak.attention(q.reshape(2, 30, 2, 4), k.reshape(2, 30, 2, 4), v.reshape(2, 30, 2, 4), mask=mask, scale=1.0)
    torch.testing.assert_close(out.reshape(2, 30, 2, 4), ref)
    # one row: plain (unscaled) attention over the row
    torch.testing.assert_close(criss_cross_attention(q[:, :1], k[:, :1], v[:, :1]),
                               ak.attention(q[:, 0], k[:, 0], v[:, 0], scale=1.0)[:, None])
    assert ((mask.double() @ mask.double()) > 0).all()  # R = 2 reaches every pixel


def test_criss_cross_module():
    m = CrissCrossAttention(16, recurrence=2).double()
    x = _rand(1, 16, 5, 4)
    torch.testing.assert_close(m(x), x)  # gamma starts at 0: identity
    with torch.no_grad():
        m.gamma.fill_(0.7)
    y = x
    for _ in range(2):
        heads = [m._heads(c(y)) for c in (m.query, m.key, m.value)]
        y = 0.7 * criss_cross_attention(*heads).reshape(1, 5, 4, 16).permute(0, 3, 1, 2) + y
    torch.testing.assert_close(m(x), y)


@pytest.mark.parametrize("name", ["neighborhood_1d", "neighborhood_2d", "neighborhood_3d", "dilated_neighborhood",
                                  "halonet", "maxvit_attention", "criss_cross"])
def test_registered_with_paper(name):
    spec = ak.info(name)
    assert spec.family == "local" and spec.paper.arxiv and spec.flops(spec.default_config) > 0
    m, inputs = spec.example()
    assert m(*inputs).shape == inputs[0].shape
