"""IP-Adapter and CrossViT against their peers (diffusers' processor, timm's CrossAttention) and their identities."""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.cross_crossvit import CrossViTCLSAttention
from attnkit.mechanisms.cross_ip_adapter import IPAdapterAttention
from attnkit.ops.cross.ip_adapter import ip_adapter_attention
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_dense import naive_attention
from peers import import_timm, skip_if_no_diffusers
from tolerances import assert_close

# ------------------------------------------------------------------------------------- IP-Adapter


def _diffusers_layer(scale: float, qkv_bias: bool = False):
    diffusers = skip_if_no_diffusers()
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=12, bias=qkv_bias)
    proc = IPAdapterAttnProcessor2_0(hidden_size=48, cross_attention_dim=24, num_tokens=(3,), scale=scale)
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_(0, 0.2)
    attn.set_processor(proc)
    assert diffusers.__version__
    return attn.eval()


@pytest.mark.filterwarnings("ignore:You have passed a tensor:FutureWarning")
@pytest.mark.parametrize(("scale", "qkv_bias"), [(1.0, False), (0.6, True), (0.0, False)])
def test_ip_adapter_from_diffusers_matches_the_processor(scale, qkv_bias):
    attn = _diffusers_layer(scale, qkv_bias)
    m = IPAdapterAttention.from_diffusers(attn)
    x, text, img = torch.randn(2, 10, 32), torch.randn(2, 7, 24), torch.randn(2, 3, 24)
    with torch.no_grad():
        theirs_tuple = attn(x, encoder_hidden_states=(text, [img]))
        theirs_cat = attn(x, encoder_hidden_states=torch.cat([text, img], 1))
        mine_cat = m(x, torch.cat([text, img], 1))
        mine_split = m(x, text, image_context=img)
    assert_close(mine_cat, theirs_cat, torch.float32, "concatenated form")
    assert_close(mine_split, theirs_tuple, torch.float32, "tuple form")


def test_ip_adapter_from_diffusers_refuses_what_it_does_not_model():
    attn = _diffusers_layer(1.0)
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn.residual_connection = True
    with pytest.raises(ValueError, match="residual_connection"):
        IPAdapterAttention.from_diffusers(attn)
    attn.residual_connection = False
    attn.set_processor(AttnProcessor2_0())
    with pytest.raises(TypeError, match="IPAdapterAttnProcessor2_0"):
        IPAdapterAttention.from_diffusers(attn)


def _ip(scale: float, **kw) -> IPAdapterAttention:
    torch.manual_seed(1)
    m = IPAdapterAttention(16, 2, num_image_tokens=3, ip_scale=scale, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_ip_adapter_scale_zero_is_text_only_cross_attention():
    m = _ip(0.0)
    x, text, img = (torch.randn(2, n, 16, dtype=torch.float64) for n in (5, 7, 3))
    b = x.shape[0]
    q = m.to_q(x).view(b, 5, 2, 8)
    k, v = m.to_k(text).view(b, 7, 2, 8), m.to_v(text).view(b, 7, 2, 8)
    expected = m.to_out(naive_attention(q, k, v).reshape(b, 5, 16))
    assert torch.equal(m(x, text, image_context=img), m(x, text, image_context=img * 0 + 5))  # image ignored
    assert_close(m(x, torch.cat([text, img], 1)), expected, torch.float64, "scale 0")


def test_ip_adapter_image_tokens_only_is_plain_cross_attention():
    m = _ip(1.0)
    x, img = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    q = m.to_q(x).view(2, 5, 2, 8)
    k, v = m.to_k_ip(img).view(2, 3, 2, 8), m.to_v_ip(img).view(2, 3, 2, 8)
    expected = m.to_out(naive_attention(q, k, v).reshape(2, 5, 16))
    assert_close(m(x, img), expected, torch.float64, "image tokens only")   # context = the 3 image tokens


def test_ip_adapter_is_decoupled_not_a_joint_softmax():
    torch.manual_seed(2)
    q, k, v, ki, vi = (torch.randn(1, n, 2, 4, dtype=torch.float64) for n in (3, 5, 5, 2, 2))
    out = ip_adapter_attention(q, k, v, ki, vi, ip_scale=1.0)
    joint = attention(q, torch.cat([k, ki], 1), torch.cat([v, vi], 1))
    assert (out - joint).abs().max() > 1e-3
    assert_close(out, naive_attention(q, k, v) + naive_attention(q, ki, vi), torch.float64, "two softmaxes")
    # same projections and tokens on both sides: (1 + lambda) * Attn(q, k, v)
    assert_close(ip_adapter_attention(q, k, v, k, v, ip_scale=0.3), 1.3 * naive_attention(q, k, v),
                 torch.float64, "1 + lambda")


def test_ip_adapter_text_mask_applies_to_the_text_branch_only():
    from attnkit.masks.cross import key_padding

    torch.manual_seed(3)
    q, k, v, ki, vi = (torch.randn(2, n, 2, 4, dtype=torch.float64) for n in (3, 5, 5, 2, 2))
    out = ip_adapter_attention(q, k, v, ki, vi, ip_scale=0.5, mask=key_padding([5, 2]))
    ref = ip_adapter_attention(q, k, v, ki, vi, ip_scale=0.5, mask=key_padding([5, 2]), backend="reference")
    assert_close(out, ref, torch.float64, "masked")
    one = naive_attention(q[1:], k[1:, :2], v[1:, :2]) + 0.5 * naive_attention(q[1:], ki[1:], vi[1:])
    assert_close(out[1], one[0], torch.float64, "example 1 sees 2 text keys and every image key")


def test_ip_adapter_op_gradients_match_the_reference():
    torch.manual_seed(4)
    args = [torch.randn(2, n, 2, 4, dtype=torch.float64, requires_grad=True) for n in (3, 5, 5, 2, 2)]
    a = ip_adapter_attention(*args, ip_scale=0.7)
    b = ip_adapter_attention(*args, ip_scale=0.7, backend="reference")
    g = torch.randn_like(a)
    grads = zip("q k v k_ip v_ip".split(), torch.autograd.grad(a, args, g), torch.autograd.grad(b, args, g))
    for name, ga, gb in grads:
        assert_close(ga, gb, torch.float64, f"d{name}", grad=True)


# --------------------------------------------------------------------------------------- CrossViT


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_crossvit_from_timm_matches_cross_attention(qkv_bias):
    timm = import_timm()
    from timm.models.crossvit import CrossAttention

    torch.manual_seed(0)
    theirs = CrossAttention(24, num_heads=3, qkv_bias=qkv_bias).eval()
    m = CrossViTCLSAttention.from_timm(theirs)
    x = torch.randn(2, 9, 24, requires_grad=True)
    y_t, y_m = theirs(x), m(x)
    assert y_m.shape == x.shape and timm.__version__
    assert_close(y_m[:, :1], y_t, torch.float32, "cls row")
    assert torch.equal(y_m[:, 1:], x[:, 1:])
    g = torch.randn_like(y_t)
    (gt,) = torch.autograd.grad(y_t, x, g)
    (gm,) = torch.autograd.grad(y_m[:, :1], x, g)
    assert_close(gm, gt, torch.float32, "dx", grad=True)


def test_crossvit_identical_branches_is_the_cls_row_of_self_attention():
    torch.manual_seed(5)
    m = CrossViTCLSAttention(16, 2, fusion="attention").double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    q, k, v = (lin(x).view(2, 7, 2, 8) for lin in (m.wq, m.wk, m.wv))
    self_attn = m.proj(naive_attention(q, k, v).reshape(2, 7, 16))           # every row of self-attention
    assert_close(m(x, x)[:, 0], self_attn[:, 0], torch.float64, "CLS row")
    assert_close(m(x)[:, 0], self_attn[:, 0], torch.float64, "no context: itself")


def test_crossvit_full_fusion_keeps_patches_and_zero_query_averages_values():
    torch.manual_seed(6)
    m = CrossViTCLSAttention(8, 2, context_dim=12).double()
    x, ctx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 9, 12, dtype=torch.float64)
    y = m(x, ctx)
    assert y.shape == x.shape and torch.equal(y[:, 1:], x[:, 1:])
    with torch.no_grad():
        m.wq.weight.zero_()
        m.wq.bias.zero_()
    # W_q = 0: uniform weights over the 1 + 8 keys, o = W_o(mean of v)
    c = m.f_proj(torch.nn.functional.gelu(m.f_norm(x[:, :1])))
    z = m.norm(torch.cat([c, ctx[:, 1:]], 1))
    o = m.proj(m.wv(z).mean(1, keepdim=True))
    expected = m.g_proj(torch.nn.functional.gelu(m.g_norm(c + o)))
    assert_close(m(x, ctx)[:, :1], expected, torch.float64, "uniform attention")
    with pytest.raises(ValueError, match="context is required"):
        m(x)
