"""Fcaformer, MixFormer, EE-MLLM, ADEM-VL, ITCFN, VideoBooth, RelationNet++, Cambrian-1 SVA, SAT and OAT's pointer:
each op against its naive twin and each paper's identities."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.mechanisms.cross_adem import ADEMFusion
from attnkit.mechanisms.cross_bvr import BridgingAttention
from attnkit.mechanisms.cross_ee_mllm import CompositeAttention
from attnkit.mechanisms.cross_fca import ForwardCrossAttention
from attnkit.mechanisms.cross_itcfn import TriModalCoAttention
from attnkit.mechanisms.cross_mixformer import MixedAttentionModule
from attnkit.mechanisms.cross_sat import SpatialTokenAttention
from attnkit.mechanisms.cross_videobooth import VideoBoothAttention
from attnkit.ops.cross import (
    adem_fusion,
    biased_attention,
    cell_local_attention,
    composite_attention,
    pointer_probs,
    spatial_token_map,
)
from attnkit.reference.naive_cross import naive_pointer_probs
from attnkit.reference.naive_dense import naive_attention
from tolerances import assert_close, nudged_double

F64 = torch.float64


def _rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_() if grad else t


def _check_op(fn, inputs, names, **kw):
    out, ref = fn(*inputs, **kw), fn(*inputs, backend="reference", **kw)
    assert_close(out, ref, F64, "out")
    g = torch.randn_like(ref)
    grads = zip(names, torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g))
    for name, a, b in grads:
        assert_close(a, b, F64, f"d{name}", grad=True)
    return out


def _self_attn(qkv, proj, x, heads, allowed=None):
    b, n, c = x.shape
    q, k, v = (t.view(b, n, heads, -1) for t in qkv(x).chunk(3, -1))
    return proj(naive_attention(q, k, v, allowed).reshape(b, n, c))


# -------------------------------------------------------------------------------------------- ops


def test_ops_match_their_naive_twins_with_gradients():
    q, k, v = (_rand(2, 9, 4, 8, seed=s, grad=True) for s in range(3))
    kv2 = [_rand(2, 9, 2, 8, seed=s + 5, grad=True) for s in range(2)]
    for backend in ("split", "masked"):
        out = composite_attention(q, *kv2, 4, backend=backend)
        assert_close(out, composite_attention(q, *kv2, 4, backend="reference"), F64, backend)
    _check_op(composite_attention, (q, *kv2), "qkv", num_visual=4)
    x, xv = _rand(2, 5, 8, grad=True), _rand(2, 7, 8, seed=1, grad=True)
    for normalize in ("count", "softmax", "none"):
        _check_op(adem_fusion, (x, xv), ("x", "xv"), normalize=normalize, drop_ratio=0.3)
    bias = _rand(2, 4, 9, 9, seed=7, grad=True)
    _check_op(biased_attention, (q, k, v, bias), ("q", "k", "v", "bias"))
    _check_op(spatial_token_map, (q[:, :1], k), ("q", "k"))


def test_cell_local_attention_matches_reference_and_one_key_cells_give_the_value():
    L = 3
    q = _rand(2, L * L, 2, 4, grad=True)
    f1 = (_rand(2, 6, 6, 2, 4, seed=1, grad=True), _rand(2, 6, 6, 2, 4, seed=2, grad=True))
    f2 = (_rand(2, 3, 3, 2, 4, seed=3, grad=True), _rand(2, 3, 3, 2, 4, seed=4, grad=True))
    out = cell_local_attention(q, [f1, f2], L)
    ref = cell_local_attention(q, [f1, f2], L, backend="reference")
    assert_close(out, ref, F64, "out")
    ins = (q, *f1, *f2)
    g = torch.randn_like(ref)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g))):
        assert_close(a, b, F64, f"d{i}", grad=True)
    one = cell_local_attention(q, [f2], L)                    # one encoder, m = 1: the cell's single value
    assert_close(one, f2[1].reshape(2, 9, 2, 4), F64, "m = 1")
    (gk,) = torch.autograd.grad(cell_local_attention(q, [f1, f2], L)[:, 0].sum(), f1[0])   # query (0, 0): its cell
    assert gk[:, 2:].abs().max() == 0 and gk[:, :, 2:].abs().max() == 0 and gk[:, :2, :2].abs().max() > 0


def test_pointer_rows_sum_to_one_masked_zero_and_permute_with_objects():
    q, k = _rand(2, 3, 1, 8), _rand(2, 6, 1, 8, seed=1)
    mask = torch.ones(1, 1, 3, 6, dtype=torch.bool)
    mask[..., 4] = False
    p = pointer_probs(q, k, mask)
    assert_close(p.sum(-1), torch.ones(2, 1, 3, dtype=F64), F64, "rows")
    assert p[..., 4].abs().max() == 0
    assert_close(p, naive_pointer_probs(q, k, mask), F64, "reference")
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert_close(pointer_probs(q, k[:, perm]), pointer_probs(q, k)[..., perm], F64, "equivariant")


# -------------------------------------------------------------------------------------- modules


def test_fca_without_cross_tokens_is_mhsa_and_alpha_scales_tokens():
    m = nudged_double(ForwardCrossAttention(8, 2))
    x, cross = _rand(2, 6, 8), _rand(2, 4, 8, seed=1)
    q = m.q_proj(x).view(2, 6, 2, 4)
    k, v = (t.view(2, 6, 2, 4) for t in m.kv_proj(x).chunk(2, -1))
    assert_close(m(x), m.proj(naive_attention(q, k, v).reshape(2, 6, 8)), F64, "first block: MHSA")
    with torch.no_grad():
        m.alpha.fill_(2.0)
    y = m(x, cross)
    with torch.no_grad():
        m.alpha.fill_(1.0)
    assert_close(y, m(x, 2 * cross), F64, "alpha multiplies the tokens")
    assert y.shape == x.shape


def test_mixformer_symmetric_is_full_attention_and_template_ignores_search():
    m = nudged_double(MixedAttentionModule(8, 2, num_template=3))
    x = _rand(2, 8, 8, grad=True)
    y = m(x)
    (g,) = torch.autograd.grad(y[:, :3].sum(), x)
    assert g[:, 3:].abs().max() == 0 and g[:, :3].abs().max() > 0
    other = torch.cat([x[:, :3], _rand(2, 5, 8, seed=4)], 1)  # another search region: cached template rows hold
    assert_close(m(other)[:, :3], y[:, :3], F64, "template rows")
    m.symmetric = True
    assert_close(m(x), _self_attn(m.qkv, m.proj, x, 2), F64, "symmetric")


def test_ee_mllm_visual_rows_are_value_projections_and_text_rows_causal():
    m = nudged_double(CompositeAttention(8, 2, num_visual=4))
    x = _rand(2, 7, 8, grad=True)
    y = m(x)
    v = m.qkv(x).chunk(3, -1)[2]
    assert_close(y[:, :4], m.proj(v[:, :4]), F64, "W_o W_v x_v")
    (g,) = torch.autograd.grad(y[:, 1].sum(), x)
    assert g[:, [0, 2, 3, 4, 5, 6]].abs().max() == 0
    causal = torch.ones(7, 7).tril().bool()
    assert_close(y[:, 4:], _self_attn(m.qkv, m.proj, x, 2, causal)[:, 4:], F64, "text rows: causal baseline")


def test_adem_has_no_parameters_zero_vision_is_identity_and_softmax_identity_is_attention():
    m = ADEMFusion(8).double()
    assert sum(p.numel() for p in m.parameters()) == 0
    x, xv = _rand(2, 5, 8), _rand(2, 7, 8, seed=1)
    assert torch.equal(m(x, torch.zeros_like(xv)), x)
    dense = ADEMFusion(8, drop_ratio=0.0, feature_map="identity", normalize="softmax").double()
    att = naive_attention(x[:, :, None], xv[:, :, None], xv[:, :, None])[:, :, 0]    # one head, identity projections
    assert_close(dense(x, xv), x + att, F64, "softmax + identity = attention")
    s = torch.nn.functional.silu(x) @ torch.nn.functional.silu(xv).transpose(1, 2)
    assert_close(ADEMFusion(8, drop_ratio=0.0).double()(x, xv), x + s @ xv / 7, F64, "gamma = 0: dense form")


def test_itcfn_missing_modality_reduces_to_two_modal_co_attention():
    m = nudged_double(TriModalCoAttention(8, 2, modality_lengths=(2, 3)))
    x = _rand(2, 9, 8)
    present = torch.tensor([[True, True, False], [True, True, True]])
    y = m(x, present)
    two = TriModalCoAttention(8, 2, modality_lengths=(2, 1)).double()              # the c tokens dropped
    two.load_state_dict(m.state_dict())
    ab = torch.cat([x[:1, :2], x[:1, 2:5]], 1)
    mod = torch.tensor([0, 0, 1, 1, 1])
    assert_close(y[:1, :5], _self_attn(m.qkv, m.proj, ab, 2, mod[:, None] != mod[None, :]), F64, "a, b: 2-modal")
    assert_close(y[1:], m(x[1:]), F64, "all present")
    with pytest.raises(ValueError, match="leaves no token for the third modality"):
        m(x[:, :5])


def test_videobooth_prompt_reaches_only_the_first_frame_and_none_is_cross_frame():
    m = nudged_double(VideoBoothAttention(8, 2, tokens_per_frame=2))
    x, prompt = _rand(1, 6, 8, grad=True), _rand(1, 3, 8, seed=1, grad=True)
    y = m(x, prompt)
    (gp,) = torch.autograd.grad(y[:, 2:].sum(), prompt)
    assert gp.abs().max() == 0                                                    # later frames: not directly
    (gp,) = torch.autograd.grad(m(x, prompt)[:, :2].sum(), prompt)
    assert gp.abs().max() > 0
    base = m(x)
    q, k, v = m.to_q(x).view(1, 6, 2, 4), m.to_k(x).view(1, 6, 2, 4), m.to_v(x).view(1, 6, 2, 4)
    f = torch.arange(6) // 2
    allowed = (f[None, :] == 0) | (f[None, :] == f[:, None])
    assert_close(base, m.to_out(naive_attention(q, k, v, allowed).reshape(1, 6, 8)), F64, "no prompt")


def test_bvr_zero_geometry_is_cross_attention_and_unsampled_keys_do_not_matter():
    x, ctx = _rand(2, 5, 8), _rand(2, 7, 8, seed=1)
    m2 = nudged_double(BridgingAttention(8, 2, topk=7, geo_hidden=4, sincos_dim=8), seed=3)
    with torch.no_grad():
        m2.geo[2].weight.zero_()
        m2.geo[2].bias.zero_()                             # G = 0: plain cross-attention over every key
    q = m2.q_proj(x).view(2, 5, 2, 4)
    k, v = m2.k_proj(ctx).view(2, 7, 2, 4), m2.v_proj(ctx).view(2, 7, 2, 4)
    assert_close(m2(x, ctx), x + m2.out_proj(naive_attention(q, k, v).reshape(2, 5, 8)), F64, "G = 0")
    m3 = nudged_double(BridgingAttention(8, 2, topk=3, geo_hidden=4, sincos_dim=8), seed=4)
    with torch.no_grad():
        idx = m3.key_score(ctx)[..., 0].topk(3, -1).indices
        keep = torch.zeros(2, 7, dtype=torch.bool).scatter(1, idx, True)
        # change only the unsampled keys, along a direction the key score does not see
        w = m3.key_score.weight[0]
        noise = _rand(2, 7, 8, seed=9)
        noise = noise - (noise @ w)[..., None] * w / w.dot(w)
        changed = torch.where(keep[..., None], ctx, ctx + 0.1 * noise)
    assert_close(m3(x, changed), m3(x, ctx), F64, "keys beyond top-k")


def test_sat_zero_query_gives_half_everywhere_and_map_shape():
    m = nudged_double(SpatialTokenAttention(8, 2))
    x = _rand(2, 1 + 16, 8)
    fg = m.foreground_map(x)
    assert fg.shape == (2, 16) and fg.view(2, 4, 4).shape == (2, 4, 4) and ((fg > 0) & (fg < 1)).all()
    y = m(x)
    assert_close(y[:, 1:], x[:, 1:] * fg[..., None], F64, "patches times their probability")
    with torch.no_grad():
        m.q_proj.weight.zero_()
        m.q_proj.bias.zero_()
    assert torch.equal(m.foreground_map(x), torch.full((2, 16), 0.5, dtype=F64))
    assert "einsum" in ak.explain("spatial_token_map", x[:, :1].view(2, 1, 2, 4), x[:, 1:].reshape(2, 16, 2, 4), None)
