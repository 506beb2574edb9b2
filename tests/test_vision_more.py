"""Paper identities of the HAT, MAXIM, OverLoCK and CrossFormer token-mixer modules (channels-last).

HAT arXiv 2205.04437; MAXIM 2201.02973; OverLoCK 2502.20087; CrossFormer 2108.00154. The generic registry
tests cover reference equality, gradients, dtypes and errors; these pin each paper's own semantics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.ops.local.multi_axis import block_attention


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _nudge(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


# ------------------------------------------------------------------------------------------------ HAT


def _hat():
    from attnkit.mechanisms.vision_hat import HATChannelAttention, HATOverlappingCrossAttention
    return HATChannelAttention, HATOverlappingCrossAttention


def test_hat_channel_is_conv_branch_times_a_per_image_channel_gate():
    CAB, _ = _hat()
    m = _nudge(CAB(12, compress_ratio=3, squeeze_factor=4)).double()
    x = _rand(2, 5, 6, 12)
    y = m.conv2(F.gelu(m.conv1(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)   # the conv branch, NCHW convs
    ratio = m(x) / y
    # the gate depends on the image and channel only: the same factor at every pixel, in (0, 1)
    assert torch.allclose(ratio, ratio[:, :1, :1].expand_as(ratio), atol=1e-9)
    assert (ratio > 0).all() and (ratio < 1).all()
    with torch.no_grad():  # zero gate parameters: sigmoid(0) = 1/2 everywhere
        for p in (m.squeeze.weight, m.squeeze.bias, m.excite.weight, m.excite.bias):
            p.zero_()
    torch.testing.assert_close(m(x), 0.5 * y)


def test_hat_channel_options_are_validated():
    CAB, _ = _hat()
    with pytest.raises(ValueError, match=r"HATChannelAttention.*squeeze_factor"):
        CAB(16, squeeze_factor=30)
    with pytest.raises(ValueError, match=r"HATChannelAttention.*compress_ratio"):
        CAB(16, compress_ratio=0)


def test_hat_ocab_without_overlap_and_bias_is_window_attention():
    _, OCAB = _hat()
    m = _nudge(OCAB(8, num_heads=2, window_size=3, overlap_ratio=0.0)).double()
    with torch.no_grad():
        m.relative_position_bias_table.zero_()
    x = _rand(2, 6, 9, 8)
    q, k, v = m.qkv(x).view(2, 6, 9, 3, 2, 4).unbind(3)
    expected = m.proj(block_attention(q, k, v, 3).reshape(2, 6, 9, 8))
    torch.testing.assert_close(m(x), expected)


def test_hat_ocab_single_window_with_masked_padding_is_global_attention():
    _, OCAB = _hat()
    m = _nudge(OCAB(8, num_heads=2, window_size=4, overlap_ratio=0.5, mask_padded_keys=True)).double()
    with torch.no_grad():
        m.relative_position_bias_table.zero_()
    x = _rand(1, 4, 4, 8)
    q, k, v = m.qkv(x).view(1, 16, 3, 2, 4).unbind(2)
    expected = m.proj(F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
                      .reshape(1, 4, 4, 8))
    torch.testing.assert_close(m(x), expected)
    m.mask_padded_keys = False  # the released code attends the zero keys: a different (diluted) result
    assert not torch.allclose(m(x), expected)


def test_hat_ocab_relative_index_is_a_bijection_onto_the_table():
    from attnkit.mechanisms.vision_hat import oca_relative_index
    M, Mo = 4, 6
    idx = oca_relative_index(M, Mo)
    assert idx.shape == (M * M, Mo * Mo)
    # the same displacement always reads the same entry; (M + Mo - 1)^2 displacements, all entries used
    assert idx.unique().numel() == (M + Mo - 1) ** 2 and int(idx.min()) >= 0
    assert idx[0, 0] == idx[M + 1, Mo + 1]  # query (1, 1), key (1, 1): displacement (0, 0) as query (0, 0)


def test_hat_ocab_errors_name_the_argument():
    _, OCAB = _hat()
    with pytest.raises(ValueError, match=r"HATOverlappingCrossAttention.*even"):
        OCAB(8, num_heads=2, window_size=4, overlap_ratio=0.25)
    m = OCAB(8, num_heads=2, window_size=4)
    with pytest.raises(ValueError, match=r"HATOverlappingCrossAttention.*window_size"):
        m(_rand(1, 6, 8, 8).float())
    with pytest.raises(ValueError, match="channels-last"):
        m(_rand(1, 8, 4, 4).float())


# ---------------------------------------------------------------------------------------------- MAXIM


def _maxim_branches(m, x):
    C = m.dim
    return F.gelu(m.in_proj(m.norm(x))).split(C, dim=-1)


def test_maxim_gmlp_at_init_gates_are_one():
    from attnkit.mechanisms.vision_maxim import MaximGatedMLP
    m = MaximGatedMLP(8, block_size=2, grid_size=3).double()   # token weights 0, bias 1: every gate is 1
    x = _rand(2, 6, 6, 8)
    ul, ug = _maxim_branches(m, x)
    expected = m.out_proj(torch.cat([ul[..., :4], ug[..., :4]], dim=-1))
    torch.testing.assert_close(m(x), expected)


def test_maxim_gmlp_whole_image_block_and_grid_are_a_global_token_mlp():
    from attnkit.mechanisms.vision_maxim import MaximGatedMLP
    m = _nudge(MaximGatedMLP(8, block_size=4, grid_size=4)).double()
    x = _rand(2, 4, 4, 8)
    ul, ug = _maxim_branches(m, x)

    def global_gmlp(z, gate):  # one dense layer over all 16 raster-ordered pixels
        z1, z2 = z.chunk(2, dim=-1)
        t = gate.norm(z2).reshape(2, 16, 4)
        return z1 * (torch.einsum("ts,bsc->btc", gate.weight, t) + gate.bias[:, None]).reshape(2, 4, 4, 4)
    expected = m.out_proj(torch.cat([global_gmlp(ul, m.local_gate), global_gmlp(ug, m.global_gate)], dim=-1))
    torch.testing.assert_close(m(x), expected)


def test_maxim_gmlp_local_branch_is_local_and_global_branch_is_dilated():
    from attnkit.mechanisms.vision_maxim import MaximGatedMLP
    m = _nudge(MaximGatedMLP(8, block_size=2, grid_size=2)).double()
    x = _rand(1, 4, 4, 8).requires_grad_()
    u = F.gelu(m.in_proj(m.norm(x)))
    local = m._gmlp(u[..., :8], m.local_gate, 2, "block")
    (g,) = torch.autograd.grad(local[0, 0, 0].sum(), x, retain_graph=True)
    reach = g.abs().sum(-1)[0] > 0           # pixel (0, 0) depends on its 2 x 2 block only
    assert reach[:2, :2].all() and not reach[2:].any() and not reach[:, 2:].any()
    glob = m._gmlp(u[..., 8:], m.global_gate, 2, "grid")
    (g,) = torch.autograd.grad(glob[0, 0, 0].sum(), x)
    reach = g.abs().sum(-1)[0] > 0           # ... on the pixels spaced (Y/g, X/g) = (2, 2) apart in the grid one
    assert reach[::2, ::2].all() and reach.sum() == 4


def test_maxim_gmlp_errors_name_the_argument():
    from attnkit.mechanisms.vision_maxim import MaximGatedMLP
    with pytest.raises(ValueError, match=r"MaximGatedMLP.*even"):
        MaximGatedMLP(7)
    with pytest.raises(ValueError, match=r"MaximGatedMLP.*grid_size"):
        MaximGatedMLP(8, block_size=2, grid_size=3)(_rand(1, 4, 4, 8).float())
