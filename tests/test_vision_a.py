"""ULSAM, BEVANet's SDLSKA + comprehensive kernel selection and OverLoCK's ContMix: ops vs their naive references
(output and every gradient), each paper's identities and parameter counts, and clear errors."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.ops.channel.sdlska import SDLSKA_KERNELS, sdlska_attention
from attnkit.ops.channel.ulsam import ulsam_attention
from attnkit.ops.vision.contmix import contmix
from attnkit.reference.naive_vision_a import (
    naive_contmix,
    naive_sdlska_attention,
    naive_sdlska_module,
    naive_ulsam_attention,
)
from tolerances import compare_fn

G = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def _nudge(m, scale=0.3, seed=0):
    torch.manual_seed(seed)
    m = m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m


# ---------------------------------------------------------------------------------------------------- ULSAM


def _ulsam_inputs(C=6, g=3, norm=True):
    inputs = {"x": _r(2, C, 4, 5), "dw_weight": _r(C), "dw_bias": _r(C), "pw_weight": _r(g, C // g),
              "pw_bias": _r(g)}
    return inputs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["paper", "code-train", "code-eval"])
def test_ulsam_op_matches_reference(dtype, form):
    C, g = 6, 3
    inputs = _ulsam_inputs(C, g)
    if form == "paper":
        kw = {"relu": False}
    else:
        inputs.update(nw=_r(C), nb=_r(C), pnw=_r(g), pnb=_r(g))
        kw = {"relu": True, "training": form == "code-train"}

    def call(fn):
        def run(x, dw_weight, dw_bias, pw_weight, pw_bias, nw=None, nb=None, pnw=None, pnb=None):
            if nw is None:
                return fn(x, dw_weight, dw_bias, pw_weight, pw_bias, g, **kw)
            rm = torch.linspace(-0.5, 0.5, C, dtype=x.dtype)
            rv = torch.linspace(0.5, 2.0, C, dtype=x.dtype)
            dn = (rm, rv, nw, nb)
            pn = (rm[:g].clone(), rv[:g].clone(), pnw, pnb)
            return fn(x, dw_weight, dw_bias, pw_weight, pw_bias, g, dw_norm=dn, pw_norm=pn, **kw)
        return run

    compare_fn(call(ulsam_attention), call(naive_ulsam_attention), inputs, dtype)


def test_ulsam_maps_sum_to_one_and_output_is_residual():
    """arXiv 2006.15102 Eq. 2-3: A_n = softmax over all H W positions; out_n = F_n * A_n + F_n."""
    m = _nudge(ak.get("ulsam", channels=8, groups=4)).eval()
    x = _r(2, 8, 5, 7)
    out = m(x)
    A = out / x - 1  # (B, C, H, W): each subspace's map, repeated over its channels
    A = A.view(2, 4, 2, 5, 7)
    torch.testing.assert_close(A[:, :, 0], A[:, :, 1])  # one map per subspace
    torch.testing.assert_close(A[:, :, 0].sum((-1, -2)), torch.ones(2, 4, dtype=torch.float64))
    assert (A >= 0).all()


def test_ulsam_constant_score_gives_uniform_map():
    """A spatially constant score (PW weight 0) gives A = 1 / (H W): out = x (1 + 1 / (H W))."""
    for form in ("paper", "code"):
        m = _nudge(ak.get("ulsam", channels=6, groups=2, form=form)).eval()
        with torch.no_grad():
            m.pw.weight.zero_()
        x = _r(3, 6, 4, 5)
        torch.testing.assert_close(m(x), x * (1 + 1 / 20))


def test_ulsam_subspaces_are_independent():
    m = _nudge(ak.get("ulsam", channels=8, groups=4)).eval()
    x = _r(1, 8, 4, 4).requires_grad_()
    out = m(x)
    for n in range(4):
        (g,) = torch.autograd.grad(out[:, 2 * n:2 * n + 2].sum(), x, retain_graph=True)
        outside = torch.ones(8, dtype=torch.bool)
        outside[2 * n:2 * n + 2] = False
        assert g[:, outside].abs().max() == 0 and g[:, ~outside].abs().max() > 0


def test_ulsam_groups_equal_channels_is_one_map_per_channel():
    """g = C: channel c's map comes from channel c alone (paper form: softmax of pw_c * maxpool(dw_c x_c + b_c))."""
    m = _nudge(ak.get("ulsam", channels=3, groups=3, form="paper"))
    x = _r(2, 3, 4, 4)
    u = torch.nn.functional.max_pool2d(x * m.dw.weight.view(1, 3, 1, 1) + m.dw.bias.view(1, 3, 1, 1), 3, 1, 1)
    s = u * m.pw.weight.view(1, 3, 1, 1) + m.pw.bias.view(1, 3, 1, 1)
    A = torch.softmax(s.flatten(2), -1).view_as(x)
    torch.testing.assert_close(m(x), x * A + x)


def test_ulsam_parameter_counts():
    """Code form 5 C + 3 g (DW 2C, BN 2C, PW C + g, BN 2g); the paper's form 3 C + g."""
    for C, g in ((64, 4), (32, 32), (12, 1)):
        assert sum(p.numel() for p in ak.get("ulsam", channels=C, groups=g).parameters()) == 5 * C + 3 * g
        assert sum(p.numel() for p in ak.get("ulsam", channels=C, groups=g, form="paper").parameters()) == 3 * C + g


def test_ulsam_train_mode_uses_batch_statistics_and_updates_buffers():
    m = _nudge(ak.get("ulsam", channels=4, groups=2, momentum=0.9))
    x = _r(3, 4, 5, 5)
    before = m.dw_norm.running_mean.clone()
    y = m(x)
    assert not torch.equal(before, m.dw_norm.running_mean)
    assert int(m.dw_norm.num_batches_tracked) == 1
    # batch statistics: the same sample in another batch gives another output
    y2 = m(torch.cat([x[:1], _r(2, 4, 5, 5)]))
    assert (y2[0] - y[0]).abs().max() > 1e-6


def test_ulsam_errors():
    with pytest.raises(ValueError, match=r"SubspaceAttention: groups \(3\) must divide channels \(8\)"):
        ak.get("ulsam", channels=8, groups=3)
    with pytest.raises(ValueError, match="form"):
        ak.get("ulsam", channels=8, form="tf")
    m = ak.get("ulsam", channels=8, groups=2)
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(1, 5, 6, 8))
    with pytest.raises(ValueError, match="ulsam_attention: groups"):
        ulsam_attention(torch.randn(1, 6, 3, 3), torch.randn(6), None, torch.randn(4, 1), None, 4)


# --------------------------------------------------------------------------------------------------- SDLSKA


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_sdlska_op_matches_reference(dtype):
    C, k0, k1, r = 5, 5, 7, 3
    inputs = {"x": _r(2, C, 9, 8), "dw_weight": _r(C, 1, k0, k0), "dw_bias": _r(C), "h_weight": _r(C, 1, 1, k1),
              "h_bias": _r(C), "v_weight": _r(C, 1, k1, 1), "v_bias": _r(C), "pw_weight": _r(C, C, 1, 1),
              "pw_bias": _r(C)}
    compare_fn(lambda **a: sdlska_attention(**a, dilation=r), lambda **a: naive_sdlska_attention(**a, dilation=r),
               inputs, dtype)


@pytest.mark.parametrize("mode", ["train", "eval", "train-one-sample"])
def test_sdlska_module_with_selection_matches_reference(mode):
    m = _nudge(ak.get("sdlska", channels=6, kernel_size=11))
    m.train(mode != "eval")
    if mode == "eval":
        with torch.no_grad():
            for bn in [m.cks.reduce_norm, *m.cks.expand_norm]:
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2)
    ref = __import__("copy").deepcopy(m)
    x = _r(1 if mode == "train-one-sample" else 3, 6, 7, 9).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out, out_r = m(x), naive_sdlska_module(ref, xr)
    torch.testing.assert_close(out, out_r)
    g = _r(*out.shape)
    gf = torch.autograd.grad(out, [x, *m.parameters()], g)
    gr = torch.autograd.grad(out_r, [xr, *ref.parameters()], g)
    for a, b in zip(gf, gr, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m.cks.reduce_norm.running_mean, ref.cks.reduce_norm.running_mean)


def test_sdlska_zero_strips_and_saturated_gates_reduce_to_small_conv_gate():
    """arXiv 2508.07300: with h = v = 0 and every selection gate 1, f = s: out = x * PW(DW_k0(x))."""
    m = _nudge(ak.get("sdlska", channels=4, kernel_size=23)).eval()
    with torch.no_grad():
        for conv in (m.conv_h, m.conv_v):
            conv.weight.zero_()
            conv.bias.zero_()
        for bn in m.cks.expand_norm:
            bn.bias.fill_(60.0)  # sigmoid(ReLU(60 + ...)) == 1 in float64
        m.cks.spatial.weight.zero_()
        m.cks.spatial.bias.fill_(60.0)
    x = _r(2, 4, 6, 7)
    s = torch.nn.functional.conv2d(x, m.conv0.weight, m.conv0.bias, padding=2, groups=4)
    torch.testing.assert_close(m(x), x * torch.nn.functional.conv2d(s, m.conv1.weight, m.conv1.bias))


def test_sdlska_channel_gates_lie_in_half_open_unit_half():
    """The sigmoid follows a ReLU: every channel gate c_i is in [0.5, 1); f / s = c_s with h = v = 0, p = 1."""
    m = _nudge(ak.get("sdlska", channels=8, kernel_size=7), scale=0.5).eval()
    with torch.no_grad():
        for conv in (m.conv_h, m.conv_v):
            conv.weight.zero_()
            conv.bias.zero_()
        m.cks.spatial.weight.zero_()
        m.cks.spatial.bias.fill_(60.0)
    s = _r(3, 8, 5, 5)
    ratio = m.cks(s, torch.zeros_like(s), torch.zeros_like(s)) / s  # (B, C, H, W): c_s, constant over H, W
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert (ratio >= 0.5).all() and (ratio < 1).all()
    assert (ratio == 0.5).any() and (ratio > 0.5).any()  # both sides of the ReLU occur at this scale


def test_sdlska_receptive_field_is_a_plus():
    """Gradient support of one output pixel (no selection, which would pool globally): the k0 x k0 square
    dilated along the two strips, i.e. |dy| <= k0/2 + r (k1-1)/2 with |dx| <= k0/2, or the transpose."""
    K = 35
    k0, k1, r = SDLSKA_KERNELS[K]
    m = _nudge(ak.get("sdlska", channels=2, kernel_size=K, selection="sum"))
    n, c = 41, 20
    x = _r(1, 2, n, n).requires_grad_()
    (g,) = torch.autograd.grad(m(x)[0, :, c, c].sum(), x)
    support = g[0].abs().sum(0) > 0
    dy = (torch.arange(n) - c).abs().view(-1, 1)
    dx = (torch.arange(n) - c).abs().view(1, -1)
    a, b = k0 // 2, k0 // 2 + r * (k1 - 1) // 2
    expected = ((dy <= a) & (dx <= b)) | ((dy <= b) & (dx <= a))
    assert torch.equal(support, expected)
    assert support.sum() == 2 * k0 * (2 * b + 1) - k0 * k0  # 325 of the dense square's 1225 pixels


@pytest.mark.parametrize("K", sorted(SDLSKA_KERNELS))
def test_sdlska_shapes_and_parameter_counts(K):
    """core (k0^2 C + C) + 2 (k1 C + C) + (C^2 + C); CKS 4 C d + 13 d + 39 C + 297 with d = max(C // 16, 32)."""
    k0, k1, _ = SDLSKA_KERNELS[K]
    for C in (16, 64, 1024):
        d = max(C // 16, 32)
        core = (k0 * k0 * C + C) + 2 * (k1 * C + C) + (C * C + C)
        cks = 4 * C * d + 13 * d + 39 * C + 297
        assert sum(p.numel() for p in ak.get("sdlska", channels=C, kernel_size=K).parameters()) == core + cks
        assert sum(p.numel() for p in ak.get("sdlska", channels=C, kernel_size=K, selection="sum").parameters()) \
            == core
    if K == 35:
        assert core + cks != 0 and sum(p.numel() for p in ak.get("sdlska", channels=64).parameters()) == 18761
    m = ak.get("sdlska", channels=4, kernel_size=K).eval()
    for size in ((2, 3), (K + 2, 5)):  # zero 'same' padding: any size, even smaller than the kernel
        x = torch.randn(2, 4, *size)
        assert m(x).shape == x.shape


def test_sdlska_errors():
    with pytest.raises(ValueError, match=r"SparseDilatedLKA: kernel_size must be one of \(7, 11, 23, 35\)"):
        ak.get("sdlska", channels=8, kernel_size=21)
    with pytest.raises(ValueError, match="selection"):
        ak.get("sdlska", channels=8, selection="softmax")
    with pytest.raises(ValueError, match="channels-last"):
        ak.get("sdlska", channels=8, kernel_size=7)(torch.randn(2, 5, 6, 8))
    with pytest.raises(ValueError, match=r"sdlska_attention: v_weight must have shape \(4, 1, 5, 1\)"):
        sdlska_attention(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), None, torch.randn(4, 1, 1, 5), None,
                         torch.randn(4, 1, 3, 1), None, torch.randn(4, 4, 1, 1), None, 2)


# --------------------------------------------------------------------------------------------------- ContMix


def _contmix_inputs(B=2, Y=5, X=6, G=2, D=3, R=4, per=2, ks=(3, 5)):
    C = len(ks) * G * per
    K = sum(k * k for k in ks)
    return {"q": _r(B, Y, X, G, D), "k": _r(B, R, G, D), "v": _r(B, Y, X, C), "proj_weight": _r(K, R),
            "proj_bias": _r(K), "rpb_s": _r(G, 2 * ks[0] - 1, 2 * ks[0] - 1),
            "rpb_l": _r(G, 2 * ks[1] - 1, 2 * ks[1] - 1)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("border", ["clamp", "zero"])
def test_contmix_op_matches_reference(dtype, border):
    def call(fn):
        return lambda q, k, v, proj_weight, proj_bias, rpb_s, rpb_l: fn(q, k, v, proj_weight, proj_bias, (3, 5),
                                                                         (rpb_s, rpb_l), border)
    compare_fn(call(contmix), call(naive_contmix), _contmix_inputs(), dtype)


def test_contmix_spatially_constant_kernel_is_a_depthwise_conv():
    """arXiv 2502.20087: a kernel that does not depend on the pixel (affinity weights 0, no position bias) makes
    ContMix an ordinary depthwise conv with kernel softmax(b): zero padding everywhere for border='zero', and at
    interior pixels for border='clamp'."""
    a = _contmix_inputs(Y=7, X=8, ks=(3, 5))
    w = torch.zeros_like(a["proj_weight"])
    C = a["v"].shape[-1]
    ref = []
    for n, (k, sl) in enumerate(((3, slice(0, 9)), (5, slice(9, 34)))):
        ker = torch.softmax(a["proj_bias"][sl], 0).view(1, 1, k, k).expand(C // 2, 1, k, k)
        vb = a["v"][..., n * C // 2:(n + 1) * C // 2].permute(0, 3, 1, 2)
        ref.append(torch.nn.functional.conv2d(vb, ker, padding=k // 2, groups=C // 2).permute(0, 2, 3, 1))
    ref = torch.cat(ref, -1)
    out = contmix(a["q"], a["k"], a["v"], w, a["proj_bias"], (3, 5), None, "zero")
    torch.testing.assert_close(out, ref)
    out = contmix(a["q"], a["k"], a["v"], w, a["proj_bias"], (3, 5), None, "clamp")
    torch.testing.assert_close(out[:, 2:-2, 2:-2, C // 2:], ref[:, 2:-2, 2:-2, C // 2:])
    torch.testing.assert_close(out[:, 1:-1, 1:-1, :C // 2], ref[:, 1:-1, 1:-1, :C // 2])
    assert (out[:, 0, 0] - ref[:, 0, 0]).abs().max() > 1e-3  # the clamped corner window differs


def test_contmix_preserves_a_constant_image():
    """Each dynamic kernel sums to 1: a constant value map is reproduced (every pixel with clamped windows,
    interior pixels with zero padding)."""
    a = _contmix_inputs(Y=7, X=7)
    v = torch.full_like(a["v"], 1.7)
    out = contmix(a["q"], a["k"], v, a["proj_weight"], a["proj_bias"], (3, 5), (a["rpb_s"], a["rpb_l"]), "clamp")
    torch.testing.assert_close(out, v)
    out = contmix(a["q"], a["k"], v, a["proj_weight"], a["proj_bias"], (3, 5), (a["rpb_s"], a["rpb_l"]), "zero")
    torch.testing.assert_close(out[:, 2:-2, 2:-2], v[:, 2:-2, 2:-2])
    assert (out[:, 0, 0] < 1.7 - 1e-6).all()


def _contmix_module(**kw):
    opts = {"dim": 8, "kernel_sizes": (3, 5), "num_heads": 2, "regions": 3, **kw}
    return _nudge(ak.get("overlock_dynamic", **opts)).eval()


def test_contmix_top_down_guidance_enters_only_through_pooled_keys():
    m = _contmix_module()
    x = _r(2, 6, 6, 8)
    torch.testing.assert_close(m(x, x), m(x))
    ctx = _r(2, 9, 12, 8)  # another spatial size: pooled to 3 x 3 regions of 3 x 4 pixels
    wiggle = _r(2, 9, 12, 8)
    wiggle = wiggle - wiggle.view(2, 3, 3, 3, 4, 8).mean((2, 4), keepdim=True).expand(2, 3, 3, 3, 4, 8).reshape(
        2, 9, 12, 8)  # zero mean inside every region
    torch.testing.assert_close(m(x, ctx + wiggle), m(x, ctx))
    assert (m(x, ctx) - m(x, ctx.flip(1))).abs().max() > 1e-6
    g = _contmix_module(context_dim=5)
    assert g(x, _r(2, 4, 4, 5)).shape == x.shape


def test_contmix_three_branches_and_the_authors_stage3_kernels():
    """kernel_sizes generalises to any number of equal channel chunks; (5, 13) is OverLoCK's stage-3 setting."""
    from attnkit.reference.naive_vision_a import naive_contmix_module
    for ks, size in (((3, 3, 5), (6, 5)), ((5, 13), (13, 14))):
        m = _contmix_module(dim=12, kernel_sizes=ks, regions=2) if len(ks) == 3 else _contmix_module(kernel_sizes=ks)
        x = _r(1, *size, m.dim)
        torch.testing.assert_close(m(x), naive_contmix_module(m, x))
        assert m.proj.out_features == sum(k * k for k in ks) and len(m.rpb) == len(ks)


def test_contmix_module_matches_reference_in_train_mode_with_context():
    from attnkit.reference.naive_vision_a import naive_contmix_module
    m = _contmix_module(context_dim=6).train()
    ref = __import__("copy").deepcopy(m)
    x, ctx = _r(2, 5, 7, 8).requires_grad_(), _r(2, 8, 8, 6).requires_grad_()
    out, out_r = m(x, ctx), naive_contmix_module(ref, x, ctx)
    torch.testing.assert_close(out, out_r)
    g = _r(*out.shape)
    for a, b in zip(torch.autograd.grad(out, [x, ctx, *m.parameters()], g),
                    torch.autograd.grad(out_r, [x, ctx, *ref.parameters()], g), strict=True):
        torch.testing.assert_close(a, b)


def test_contmix_errors():
    with pytest.raises(ValueError, match=r"ContMix: dim \(12\) must be divisible by len\(kernel_sizes\) \* num_heads"):
        ak.get("overlock_dynamic", dim=12, num_heads=4)
    with pytest.raises(ValueError, match="kernel_sizes must be a non-empty tuple of odd ints"):
        ak.get("overlock_dynamic", dim=8, num_heads=2, kernel_sizes=(5, 6))
    m = _contmix_module()
    with pytest.raises(ValueError, match="channels-last"):
        m(_r(1, 8, 6, 6))
    with pytest.raises(ValueError, match=r"ContMix: border='clamp' needs a map of at least the largest of"):
        m(_r(1, 4, 9, 8))
    assert _contmix_module(border="zero")(_r(1, 2, 3, 8)).shape == (1, 2, 3, 8)
    with pytest.raises(ValueError, match="context_dim=5 differs from dim=8"):
        _contmix_module(context_dim=5)(_r(1, 6, 6, 8))
    with pytest.raises(ValueError, match=r"contmix: border='clamp' .* needs Y, X >= kernel size 5"):
        a = _contmix_inputs(Y=4, X=6)
        contmix(a["q"], a["k"], a["v"], a["proj_weight"], a["proj_bias"], (3, 5))
