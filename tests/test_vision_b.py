"""Ops and paper identities of the NiNformer, CrossFormer (LSDA) and MAXIM cross-gating token mixers.

NiNformer arXiv 2403.02411; CrossFormer 2108.00154; MAXIM 2201.02973. The generic registry tests cover the
registered modules against their twins (dtypes, gradients, errors); these check each op's fast backend
against its naive twin (output and every gradient) and pin each paper's own semantics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.ops.local.multi_axis import block_attention, grid_attention, relative_bias
from attnkit.ops.vision.lsda import long_short_distance_attention, lsda_group_shape
from attnkit.reference.naive_vision_b import naive_dynamic_position_bias


def _rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.requires_grad_() if grad else t


def _nudge(m, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _assert_same_with_grads(fast, slow, inputs, atol=1e-10):
    """``fast(*inputs)`` vs ``slow(*inputs)``: the output and the gradient of every input, fp64."""
    a, b = fast(*inputs), slow(*inputs)
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    g = _rand(*a.shape, seed=99)
    ga = torch.autograd.grad(a, inputs, g)
    gb = torch.autograd.grad(b, inputs, g)
    for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m, i=i: f"d input{i}: {m}")


# ---------------------------------------------------------------------------------------- CrossFormer


def _crossformer():
    from attnkit.mechanisms.vision_crossformer import CrossFormerLSDA
    return CrossFormerLSDA


@pytest.mark.parametrize(("mode", "size", "pad", "yx"), [
    ("short", 2, False, (4, 6)), ("long", 2, False, (4, 6)), ("long", (2, 3), False, (4, 6)),
    ("short", 3, True, (5, 7)), ("long", 2, True, (5, 7)),
], ids=["sda", "lda", "lda-2x3", "sda-pad", "lda-pad"])
def test_lsda_sdpa_matches_naive_with_every_gradient(mode, size, pad, yx):
    Y, X = yx
    gh, gw = lsda_group_shape(Y, X, size, mode, pad)
    q, k, v = (_rand(2, Y, X, 2, 4, seed=s, grad=True) for s in range(3))
    bias = _rand(2, gh * gw, gh * gw, seed=5, grad=True)

    def run(backend):
        return lambda q, k, v, b: long_short_distance_attention(q, k, v, size, mode=mode, bias=b, pad=pad,
                                                                backend=backend)
    _assert_same_with_grads(run("sdpa"), run("reference"), (q, k, v, bias))


def test_sda_is_maxvit_block_and_lda_is_maxvit_grid():
    # SDA(G = P) = MaxViT block(P); LDA with interval (Y/G, X/G) = MaxViT grid(G): same partition, same bias slots
    q, k, v = (_rand(2, 6, 9, 2, 4, seed=s) for s in range(3))
    bias = _rand(2, 9, 9, seed=4)
    torch.testing.assert_close(long_short_distance_attention(q, k, v, 3, mode="short", bias=bias),
                               block_attention(q, k, v, 3, bias=bias))
    torch.testing.assert_close(long_short_distance_attention(q, k, v, (2, 3), mode="long", bias=bias),
                               grid_attention(q, k, v, 3, bias=bias))


def test_lda_interval_one_and_sda_whole_map_are_global_attention():
    q, k, v = (_rand(1, 4, 4, 2, 4, seed=s) for s in range(3))
    dense = F.scaled_dot_product_attention(*(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)))
    dense = dense.transpose(1, 2).reshape(1, 4, 4, 2, 4)
    torch.testing.assert_close(long_short_distance_attention(q, k, v, 1, mode="long"), dense)
    torch.testing.assert_close(long_short_distance_attention(q, k, v, 4, mode="short"), dense)


def test_lsda_sizes_that_do_not_divide_the_map_name_the_argument():
    q = _rand(1, 5, 6, 2, 4)
    with pytest.raises(ValueError, match=r"long_short_distance_attention.*size \(group size G\)"):
        long_short_distance_attention(q, q, q, 2, mode="short")
    with pytest.raises(ValueError, match=r"size \(interval I\)"):
        long_short_distance_attention(q, q, q, 4, mode="long")
    with pytest.raises(ValueError, match=r"bias must be \(H, n, n\)"):
        long_short_distance_attention(q, q, q, 2, mode="long", pad=True, bias=torch.zeros(2, 4, 4))
    CF = _crossformer()
    with pytest.raises(ValueError, match=r"CrossFormerLSDA.*group_size \(4\)"):
        CF(16, 2, 4)(torch.randn(1, 6, 10, 16))
    with pytest.raises(ValueError, match=r"CrossFormerLSDA.*interval \(4\)"):
        CF(16, 2, 2, mode="long", interval=4)(torch.randn(1, 6, 8, 16))
    with pytest.raises(ValueError, match=r"CrossFormerLSDA: mode"):
        CF(16, 2, mode="medium")


def test_lsda_padding_masks_padded_keys_and_crops():
    # the padded map's output on the real pixels == the unpadded attention restricted to the real keys: for
    # SDA on a 5 x 5 map with G = 3 the corner group (rows 3-4, cols 3-4) attends among its own 4 pixels only
    q, k, v = (_rand(1, 5, 5, 1, 4, seed=s) for s in range(3))
    out = long_short_distance_attention(q, k, v, 3, mode="short", pad=True)
    assert out.shape == (1, 5, 5, 1, 4)
    corner = [t[:, 3:, 3:].reshape(1, 4, 1, 4).transpose(1, 2) for t in (q, k, v)]
    expect = F.scaled_dot_product_attention(*corner).transpose(1, 2).reshape(1, 2, 2, 1, 4)
    torch.testing.assert_close(out[:, 3:, 3:], expect)


def test_dynamic_position_bias_depends_on_the_offset_only_and_matches_its_naive_twin():
    CF = _crossformer()
    m = _nudge(CF(32, 4, 3, dpb_dim=8)).double()  # dim // 16 = 2 would make LN collapse to two values
    bias = m.pos(3, 4)                                           # (H, 12, 12)
    torch.testing.assert_close(bias, naive_dynamic_position_bias(m.pos, 3, 4))
    # equal slot offsets give equal biases: slots (0,0)->(1,1) and (1,2)->(2,3) share offset (-1, -1)
    torch.testing.assert_close(bias[:, 0, 5], bias[:, 6, 11])
    assert (bias[:, 0, 5] - bias[:, 0, 6]).abs().max() > 1e-6   # different offsets differ
    # every DPB parameter gets the gradient the per-pair naive MLP gives
    g = _rand(*bias.shape, seed=3)
    ga = torch.autograd.grad(bias, list(m.pos.parameters()), g)
    gb = torch.autograd.grad(naive_dynamic_position_bias(m.pos, 3, 4), list(m.pos.parameters()), g)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_crossformer_with_dpb_equals_maxvit_relative_attention_with_the_dpb_table():
    # with the DPB frozen into a ((2G-1)^2, H) table, SDA is MaxViT's block attention with that relative table
    from attnkit.mechanisms.maxvit import MultiAxisAttention
    CF = _crossformer()
    m = _nudge(CF(16, 2, 2, mode="short")).double()
    mv = MultiAxisAttention(16, 2, block_size=2, grid_size=2).double()
    with torch.no_grad():
        mv.block.qkv.load_state_dict(m.qkv.state_dict())
        mv.block.proj.load_state_dict(m.proj.state_dict())
        table, _ = m.pos.pos3(m.pos.pos2(m.pos.pos1(m.pos.pos_proj(
            torch.tensor([[dy, dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.float64))))), None
        mv.block.table.copy_(table)
    x = _rand(2, 4, 6, 16)
    torch.testing.assert_close(m(x), mv.block(x))
    torch.testing.assert_close(m.pos(2, 2), relative_bias(table, 2))


def test_crossformer_lda_default_interval_and_small_maps():
    CF = _crossformer()
    m = CF(16, 2, 2, mode="long")
    assert m.plan(4, 6) == ("long", (2, 3), (2, 2))               # interval Y/G, X/G: G x G groups
    assert m.plan(2, 6) == ("short", (2, 2), (2, 2))              # min(Y, X) <= G: SDA, G = min(Y, X)
    assert CF(16, 2, 2, mode="long", interval=3, pad=True).plan(7, 8) == ("long", (3, 3), (3, 3))
    x = _rand(1, 2, 2, 16)  # a map no larger than G: one group, global attention with the DPB
    m = _nudge(CF(16, 2, 7)).double()
    q, k, v = m.qkv(x).view(1, 2, 2, 3, 2, 8).unbind(3)
    qf, kf, vf = (t.reshape(1, 4, 2, 8).transpose(1, 2) for t in (q, k, v))
    dense = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=m.pos(2, 2)).transpose(1, 2).reshape(1, 2, 2, 16)
    torch.testing.assert_close(m(x), m.proj(dense))


# ---------------------------------------------------------------------------------------- NiNformer


def _ninformer():
    from attnkit.mechanisms.vision_ninformer import NiNformerGating
    return NiNformerGating


def test_token_mixing_mlp_matmul_matches_naive_with_every_gradient():
    from attnkit.ops.vision.ninformer import token_mixing_mlp
    x = _rand(2, 6, 5, grad=True)
    w1, b1, w2, b2 = _rand(4, 6, seed=1, grad=True), _rand(4, seed=2, grad=True), _rand(6, 4, seed=3, grad=True), \
        _rand(6, seed=4, grad=True)

    def run(backend):
        return lambda *a: token_mixing_mlp(*a, backend=backend)
    _assert_same_with_grads(run("matmul"), run("reference"), (x, w1, b1, w2, b2))


def test_ninformer_gate_identity_is_the_mixer_block():
    # gate Linear with weight 0 and bias 1: the unit returns the inner Mixer block's output, written here as
    # MLP-Mixer writes it (transpose, Linear over tokens, transpose back)
    m = _nudge(_ninformer()(8, num_tokens=12, hidden_dim=10, token_hidden_dim=6)).double()
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias.fill_(1.0)
    x = _rand(2, 3, 4, 8)
    u = x.reshape(2, 12, 8)
    v = u + m.token_mlp(m.token_norm(u).transpose(1, 2)).transpose(1, 2)
    v = v + m.channel_mlp(m.channel_norm(v))
    torch.testing.assert_close(m(x), v.reshape(2, 3, 4, 8))


def test_ninformer_is_tied_to_its_resolution_and_not_permutation_equivariant():
    m = _nudge(_ninformer()(8, num_tokens=12)).double()
    with pytest.raises(ValueError, match=r"NiNformerGating.*num_tokens = 12"):
        m(_rand(1, 4, 4, 8))
    x = _rand(1, 3, 4, 8)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted_in = x.reshape(1, 12, 8)[:, perm].reshape(1, 3, 4, 8)
    out_of_permuted = m(permuted_in).reshape(1, 12, 8)
    assert (out_of_permuted - m(x).reshape(1, 12, 8)[:, perm]).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------- MAXIM cross gating


def _cgb():
    from attnkit.mechanisms.vision_maxim_cross import MaximCrossGating
    return MaximCrossGating


def test_multi_axis_spatial_weights_matmul_matches_naive_with_every_gradient():
    from attnkit.ops.vision.cross_gating import multi_axis_spatial_weights
    u = _rand(2, 4, 6, 6, grad=True)
    gw, gb = _rand(4, 4, seed=1, grad=True), _rand(4, seed=2, grad=True)
    bw, bb = _rand(4, 4, seed=3, grad=True), _rand(4, seed=4, grad=True)

    def run(backend):
        return lambda u, gw, gb, bw, bb: multi_axis_spatial_weights(u, gw, gb, 2, bw, bb, 2, backend=backend)
    _assert_same_with_grads(run("matmul"), run("reference"), (u, gw, gb, bw, bb))


def test_cross_gating_two_streams_match_the_twin_with_input_gradients():
    from attnkit.reference.naive_vision_b import naive_maxim_cross_gating_module
    m = _nudge(_cgb()(6, block_size=2, grid_size=2, y_dim=4)).double()
    x, y = _rand(2, 4, 6, 6, seed=1, grad=True), _rand(2, 4, 6, 4, seed=2, grad=True)

    def pack(fn):
        return lambda x, y: torch.cat(fn(m, x, y, return_both=True), -1)
    _assert_same_with_grads(pack(lambda m, x, y, **kw: m(x, y, **kw)), pack(naive_maxim_cross_gating_module), (x, y))
    torch.testing.assert_close(m(x, y), m(x, y, return_both=True)[0])


def test_cross_gating_unit_gates_are_the_identity_and_token_weights_zero_mix_nothing():
    m = _nudge(_cgb()(6, block_size=2, grid_size=2)).double()
    x, y = _rand(1, 4, 4, 6, seed=1), _rand(1, 4, 4, 6, seed=2)
    with torch.no_grad():  # G == 1: both gates' output projections give 1 everywhere
        for g in (m.gate_x, m.gate_y):
            g.out_proj.weight.zero_()
            g.out_proj.bias.fill_(1.0)
    x0, y0 = m.proj_x(x), m.proj_y(y)
    y_out = y0 + m.out_y(F.gelu(m.in_y(m.norm_y(y0))))
    x_out = x0 + m.out_x(F.gelu(m.in_x(m.norm_x(x0)))) + y_out
    got = m(x, y, return_both=True)
    torch.testing.assert_close(got[0], x_out)
    torch.testing.assert_close(got[1], y_out)
    # token weights 0, biases 1: the spatial weights mix no tokens, so each pixel's output reads its own pixel only
    m = _nudge(_cgb()(6, block_size=2, grid_size=2)).double()
    with torch.no_grad():
        for g in (m.gate_x, m.gate_y):
            g.grid_weight.zero_(), g.block_weight.zero_(), g.grid_bias.fill_(1.0), g.block_bias.fill_(1.0)
    x2, y2 = x.clone(), y.clone()
    x2[:, 0, 0] += 1.0
    y2[:, 0, 1] += 1.0
    a, b = m(x, y), m(x2, y2)
    assert (a[:, 0, :2] - b[:, 0, :2]).abs().min() > 0
    torch.testing.assert_close(a[:, 1:], b[:, 1:])
    torch.testing.assert_close(a[:, 0, 2:], b[:, 0, 2:])


def test_cross_gating_aggregate_false_and_errors():
    m = _nudge(_cgb()(6, block_size=2, grid_size=2, aggregate=False)).double()
    x, y = _rand(1, 4, 4, 6, seed=1), _rand(1, 4, 4, 6, seed=2)
    x_out = m(x, y, return_both=True)[0]
    x1 = F.gelu(m.in_x(m.norm_x(m.proj_x(x))))
    gy = m.gate_y(F.gelu(m.in_y(m.norm_y(m.proj_y(y)))))
    torch.testing.assert_close(x_out, m.proj_x(x) + m.out_x(x1 * gy))
    with pytest.raises(ValueError, match=r"MaximCrossGating: y must share x's"):
        m(x, _rand(1, 2, 4, 6))
    with pytest.raises(ValueError, match=r"MaximCrossGating.*grid_size \(3\)"):
        _cgb()(6, block_size=2, grid_size=3)(x)
