"""Naive references of the channel-family ops (``ops/channel``) and their modules (``mechanisms/channel_*``).

Every function is the paper's equation written out with plain tensor code (float64 for float64 inputs, float32
otherwise); the module twins read a module's own parameters and repeat its forward without calling any op.
Imports only torch.
"""

from __future__ import annotations

import torch


def _work(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _f(t, wt):
    return None if t is None else t.to(wt)


# ----------------------------------------------------------------------------------------------- ECA


def naive_eca_attention(x, weight, bias=None):
    """ECA (arXiv 1910.03151, Sec. 3.2): ``z_c = sum_j w_j y_{c + j - (k-1)/2}`` over the channel means ``y``
    (zero outside ``[0, C)``), ``out = x * sigmoid(z)``. ``x (B, C, H, W)``, ``weight (k,)``."""
    wt = _work(x)
    xw, w = x.to(wt), weight.to(wt)
    B, C = x.shape[:2]
    k = w.shape[0]
    y = xw.mean(dim=(2, 3))  # (B, C)
    z = []
    for c in range(C):
        acc = torch.zeros(B, dtype=wt) if bias is None else bias.to(wt).expand(B).clone()
        for j in range(k):
            src = c + j - (k - 1) // 2
            if 0 <= src < C:
                acc = acc + w[j] * y[:, src]
        z.append(acc)
    gate = torch.sigmoid(torch.stack(z, 1))  # (B, C)
    return (xw * gate[:, :, None, None]).to(x.dtype)


def naive_eca_module(module, x):
    return naive_eca_attention(x, module.weight, module.bias)


# ----------------------------------------------------------------------------------------------- ELA


def _conv1d(z, w, b, groups):
    """Grouped 1-D convolution with zero 'same' padding, written as shifted sums: ``z (B, C, L)``."""
    B, C, L = z.shape
    k, per = w.shape[-1], C // groups
    zp = torch.cat([z.new_zeros(B, C, k // 2), z, z.new_zeros(B, C, k // 2)], 2)  # (B, C, L + k - 1)
    out = []
    for o in range(C):
        g = o // per
        acc = z.new_zeros(B, L) if b is None else b[o].expand(B, L).clone()
        for i in range(per):
            for j in range(k):
                acc = acc + w[o, i, j] * zp[:, g * per + i, j:j + L]
        out.append(acc)
    return torch.stack(out, 1)


def _group_norm(y, groups, weight, bias, eps):
    """GroupNorm written out: statistics over (C / groups channels x all positions) per sample."""
    B, C = y.shape[:2]
    g = y.reshape(B, groups, -1)  # (B, G, C/G * L)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    out = ((g - mean) / torch.sqrt(var + eps)).reshape(y.shape)
    shape = (1, C) + (1,) * (y.dim() - 2)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def _act(y, act):
    if act == "silu":
        return y * torch.sigmoid(y)
    if act == "relu":
        return y.clamp_min(0)
    return y


def naive_ela_attention(x, weight, bias, groups, norm_groups, norm_weight, norm_bias, eps, act, weight_w=None,
                        bias_w=None, norm_weight_w=None, norm_bias_w=None, skip=False):
    """ELA (arXiv 2403.01123, Sec. 3): ``y_h = sigmoid(act(GN(F(mean_W x))))``, ``y_w`` likewise from ``mean_H x``,
    ``out = x * y_h * y_w`` (``+ x`` with ``skip``). W-direction parameters default to the H ones (shared)."""
    wt = _work(x)
    xw = x.to(wt)
    weight_w = weight if weight_w is None else weight_w
    bias_w = bias if bias_w is None else bias_w
    norm_weight_w = norm_weight if norm_weight_w is None else norm_weight_w
    norm_bias_w = norm_bias if norm_bias_w is None else norm_bias_w

    def gate(z, w, b, nw, nb):
        y = _conv1d(z, w.to(wt), _f(b, wt), groups)
        if norm_groups is not None:
            y = _group_norm(y, norm_groups, _f(nw, wt), _f(nb, wt), eps)
        return torch.sigmoid(_act(y, act))

    y_h = gate(xw.mean(3), weight, bias, norm_weight, norm_bias)  # (B, C, H)
    y_w = gate(xw.mean(2), weight_w, bias_w, norm_weight_w, norm_bias_w)  # (B, C, W)
    out = xw * y_h[:, :, :, None] * y_w[:, :, None, :]
    return (out + xw if skip else out).to(x.dtype)


def naive_ela_module(module, x):
    p = module.op_kwargs()
    return naive_ela_attention(x, module.weight, module.bias, p["groups"], p["norm_groups"], p["norm_weight"],
                               p["norm_bias"], p["eps"], p["act"], p["weight_w"], p["bias_w"], p["norm_weight_w"],
                               p["norm_bias_w"], p["skip"])


# ----------------------------------------------------------------------------------------------- LKA


def _dw_conv2d(x, w, b, dilation=1):
    """Depthwise 2-D convolution with zero 'same' padding as a sum of shifted, scaled copies of ``x``."""
    B, C, H, W = x.shape
    k = w.shape[-1]
    p = dilation * (k - 1) // 2
    xp = x.new_zeros(B, C, H + 2 * p, W + 2 * p)
    xp[:, :, p:p + H, p:p + W] = x
    out = x.new_zeros(B, C, H, W) if b is None else b.view(1, C, 1, 1).expand(B, C, H, W).clone()
    for i in range(k):
        for j in range(k):
            oy, ox = i * dilation, j * dilation
            out = out + w[:, 0, i, j].view(1, C, 1, 1) * xp[:, :, oy:oy + H, ox:ox + W]
    return out


def _pw_conv2d(x, w, b):
    """1 x 1 convolution: ``out[o] = sum_i w[o, i] x[i] + b[o]``."""
    out = torch.einsum("oi,bihw->bohw", w[:, :, 0, 0], x)
    return out if b is None else out + b.view(1, -1, 1, 1)


def naive_lka_attention(x, dw_weight, dw_bias, dil_weight, dil_bias, pw_weight, pw_bias, dilation=3):
    """VAN's LKA (arXiv 2202.09741, Eq. 1-2): ``out = x * PW(DW_dilated(DW(x)))``."""
    wt = _work(x)
    xw = x.to(wt)
    a = _dw_conv2d(xw, dw_weight.to(wt), _f(dw_bias, wt))
    a = _dw_conv2d(a, dil_weight.to(wt), _f(dil_bias, wt), dilation)
    a = _pw_conv2d(a, pw_weight.to(wt), _f(pw_bias, wt))
    return (xw * a).to(x.dtype)


def naive_lka_module(module, x):
    return naive_lka_attention(x, module.conv0.weight, module.conv0.bias, module.conv_spatial.weight,
                               module.conv_spatial.bias, module.conv1.weight, module.conv1.bias, module.dilation)
