"""Naive references of ULSAM, BEVANet's SDLSKA + comprehensive kernel selection and OverLoCK's ContMix, op twins
and module twins.

Every function writes its paper's equations out with plain tensor code: loops over subspaces, branches and kernel
offsets, batch normalisation from its definition, softmax as ``exp / sum``. Computation in float64 for float64
inputs, float32 otherwise. Module twins read a module's own parameters and buffers and repeat its forward without
calling any op. Imports only torch.
"""

from __future__ import annotations

import math

import torch

from attnkit.reference.naive_channel import _f, _work


def naive_batch_norm(x, norm, training, momentum, eps, channel_dim=1):
    """Batch normalisation from its definition. ``norm = (running_mean, running_var, weight, bias)`` (entries may
    be None, as ``F.batch_norm``). Training: biased batch statistics over every dimension but ``channel_dim``; the
    running buffers (if any) are updated in place with the unbiased variance, as ``nn.BatchNorm2d``."""
    rm, rv, w, b = norm
    C = x.shape[channel_dim]
    dims = [d for d in range(x.dim()) if d != channel_dim]
    shape = [1] * x.dim()
    shape[channel_dim] = C
    if training or rm is None:
        mean = x.mean(dims)
        var = ((x - mean.view(shape)) ** 2).mean(dims)
        if training and rm is not None:
            n = x.numel() // C
            with torch.no_grad():
                rm.mul_(1 - momentum).add_(momentum * mean.detach().to(rm.dtype))
                rv.mul_(1 - momentum).add_(momentum * (var.detach() * n / max(n - 1, 1)).to(rv.dtype))
    else:
        mean, var = rm.to(x.dtype), rv.to(x.dtype)
    out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if w is not None:
        out = out * w.to(x.dtype).view(shape)
    if b is not None:
        out = out + b.to(x.dtype).view(shape)
    return out


def _bn_tuple(bn):
    return (bn.running_mean, bn.running_var, bn.weight, bn.bias)


def _bn_momentum(bn):
    return 0.0 if bn.momentum is None else bn.momentum


def _relu(t):
    return torch.where(t > 0, t, torch.zeros_like(t))


def _softmax(t, dim):
    e = torch.exp(t - t.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def _max_pool3(u):
    """3 x 3 max pool, stride 1, the border padded with -inf (only real neighbours compete)."""
    B, C, H, W = u.shape
    up = u.new_full((B, C, H + 2, W + 2), -math.inf)
    up[:, :, 1:H + 1, 1:W + 1] = u
    out = up[:, :, 0:H, 0:W]
    for i in range(3):
        for j in range(3):
            out = torch.maximum(out, up[:, :, i:i + H, j:j + W])
    return out


# --------------------------------------------------------------------------------------------------- ULSAM


def naive_ulsam_attention(x, dw_weight, dw_bias, pw_weight, pw_bias, groups, dw_norm=None, pw_norm=None,
                          relu=True, training=False, momentum=0.1, eps=1e-5):
    """ULSAM (arXiv 2006.15102, Sec. 3, Eq. 1-3), one subspace at a time: ``F_n = x[:, nG:(n+1)G]``,
    ``u = act(BN(dw * F_n + b))``, ``u = maxpool3(u)``, ``s = act(BN(sum_c pw[n, c] u_c + b_n))``,
    ``A_n = softmax_{H W}(s)``, ``out_n = F_n * A_n + F_n``; ``x (B, C, H, W)``, ``pw_weight (groups, C/groups)``."""
    wt = _work(x)
    xw = x.to(wt)
    B, C, H, W = x.shape
    G = C // groups
    outs = []
    for n in range(groups):
        sl = slice(n * G, (n + 1) * G)
        Fn = xw[:, sl]  # (B, G, H, W)
        u = Fn * dw_weight[sl].to(wt).view(1, G, 1, 1)
        if dw_bias is not None:
            u = u + dw_bias[sl].to(wt).view(1, G, 1, 1)
        if dw_norm is not None:
            u = naive_batch_norm(u, tuple(None if t is None else t[sl] for t in dw_norm), training, momentum, eps)
        if relu:
            u = _relu(u)
        u = _max_pool3(u)
        s = (u * pw_weight[n].to(wt).view(1, G, 1, 1)).sum(1, keepdim=True)  # (B, 1, H, W)
        if pw_bias is not None:
            s = s + pw_bias[n].to(wt)
        if pw_norm is not None:
            s = naive_batch_norm(s, tuple(None if t is None else t[n:n + 1] for t in pw_norm), training, momentum,
                                 eps)
        if relu:
            s = _relu(s)
        A = _softmax(s.reshape(B, 1, H * W), -1).reshape(B, 1, H, W)  # sums to 1 over H W
        outs.append(Fn * A + Fn)
    return torch.cat(outs, 1).to(x.dtype)


def naive_ulsam_module(module, x):
    code = module.form == "code"
    # the running buffers of the twin's own copy are updated like the module's; a separate copy is not needed
    return naive_ulsam_attention(
        x, module.dw.weight.view(-1), module.dw.bias, module.pw.weight.view(module.groups, -1), module.pw.bias,
        module.groups, _bn_tuple(module.dw_norm) if code else None, _bn_tuple(module.pw_norm) if code else None,
        relu=code, training=module.training, momentum=_bn_momentum(module.dw_norm) if code else 0.1,
        eps=module.dw_norm.eps if code else 1e-5)


# --------------------------------------------------------------------------------------------------- SDLSKA


def _dw_conv(x, w, b, dilation=1):
    """Depthwise conv with zero 'same' padding (``dilation (k - 1) / 2`` per axis) as a sum of shifted copies;
    ``w (C, 1, kh, kw)``, odd extents."""
    B, C, H, W = x.shape
    kh, kw = w.shape[-2:]
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    xp = x.new_zeros(B, C, H + 2 * ph, W + 2 * pw)
    xp[:, :, ph:ph + H, pw:pw + W] = x
    out = x.new_zeros(B, C, H, W) if b is None else b.view(1, C, 1, 1).expand(B, C, H, W).clone()
    for i in range(kh):
        for j in range(kw):
            out = out + w[:, 0, i, j].view(1, C, 1, 1) * xp[:, :, i * dilation:i * dilation + H,
                                                            j * dilation:j * dilation + W]
    return out


def _pw(x, w, b):
    out = torch.einsum("oi,bihw->bohw", w[:, :, 0, 0], x)
    return out if b is None else out + b.view(1, -1, 1, 1)


def _full_conv(x, w, b):
    """Dense conv ``w (O, I, k, k)`` with zero 'same' padding as shifted matrix products."""
    B, _, H, W = x.shape
    k = w.shape[-1]
    p = k // 2
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    out = b.view(1, -1, 1, 1).expand(B, -1, H, W).clone()
    for i in range(k):
        for j in range(k):
            out = out + torch.einsum("oi,bihw->bohw", w[:, :, i, j], xp[:, :, i:i + H, j:j + W])
    return out


def naive_kernel_selection(cks, s, h, v):
    """BEVANet's comprehensive kernel selection (arXiv 2508.07300, Sec. 3), from ``cks``'s parameters:
    ``t = s + h + v``; channel gates ``c_i = sigmoid(ReLU(BN(DW3(PW(ReLU(BN(DW3(PW(mean_{HW} t)))))))))`` per
    branch; spatial gates ``p = sigmoid(Conv7([mean_c t, max_c t]))``; ``f = sum_i branch_i * c_i * p_i``."""
    wt = s.dtype
    P = {n: p.to(wt) for n, p in cks.named_parameters()}

    def bn(z, mod):  # one sample in training: the running statistics (the module's rule for a 1 x 1 map)
        return naive_batch_norm(z, (mod.running_mean, mod.running_var, mod.weight.to(wt), mod.bias.to(wt)),
                                mod.training and s.shape[0] > 1, _bn_momentum(mod), mod.eps)

    t = s + h + v
    g = t.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
    z = _relu(bn(_dw_conv(_pw(g, P["reduce_pw.weight"], P["reduce_pw.bias"]), P["reduce_dw.weight"],
                          P["reduce_dw.bias"]), cks.reduce_norm))  # (B, d, 1, 1)
    gates = []
    for i in range(3):
        c = _pw(z, P[f"expand_pw.{i}.weight"], P[f"expand_pw.{i}.bias"])
        c = _relu(bn(_dw_conv(c, P[f"expand_dw.{i}.weight"], P[f"expand_dw.{i}.bias"]), cks.expand_norm[i]))
        gates.append(1 / (1 + torch.exp(-c)))  # (B, C, 1, 1), in [0.5, 1)
    m = torch.cat([t.mean(1, keepdim=True), t.amax(1, keepdim=True)], 1)  # (B, 2, H, W)
    p = 1 / (1 + torch.exp(-_full_conv(m, P["spatial.weight"], P["spatial.bias"])))  # (B, 3, H, W)
    return sum(br * c * p[:, i:i + 1] for i, (br, c) in enumerate(zip((s, h, v), gates, strict=True)))


def naive_sdlska_attention(x, dw_weight, dw_bias, h_weight, h_bias, v_weight, v_bias, pw_weight, pw_bias, dilation,
                           select=None):
    """BEVANet's SDLSKA (arXiv 2508.07300, Sec. 3): ``s = DW_k0(x)``; two parallel dilated strips of ``s``,
    ``h = DW_{1 x k1, r}(s)``, ``v = DW_{k1 x 1, r}(s)``; ``f = select(s, h, v)`` (None: ``s + h + v``);
    ``out = x * PW(f)``."""
    wt = _work(x)
    xw = x.to(wt)
    s = _dw_conv(xw, dw_weight.to(wt), _f(dw_bias, wt))
    h = _dw_conv(s, h_weight.to(wt), _f(h_bias, wt), dilation)
    v = _dw_conv(s, v_weight.to(wt), _f(v_bias, wt), dilation)
    f = s + h + v if select is None else select(s, h, v)
    return (xw * _pw(f, pw_weight.to(wt), _f(pw_bias, wt))).to(x.dtype)


def naive_sdlska_module(module, x):
    select = None if module.cks is None else (lambda s, h, v: naive_kernel_selection(module.cks, s, h, v))
    return naive_sdlska_attention(x, module.conv0.weight, module.conv0.bias, module.conv_h.weight, module.conv_h.bias,
                                  module.conv_v.weight, module.conv_v.bias, module.conv1.weight, module.conv1.bias,
                                  module.dilation, select)


# --------------------------------------------------------------------------------------------------- ContMix


def _window_start(p, n, k, border):
    """First row (column) of pixel ``p``'s ``k``-window on an axis of ``n``: centred (zero padding outside) or,
    for ``border='clamp'``, shifted inside the image at the borders (neighbourhood-attention windows)."""
    r = k // 2
    return min(max(p - r, 0), n - k) if border == "clamp" else p - r


def naive_contmix(q, k, v, proj_weight, proj_bias, kernel_sizes, rpb=None, border="clamp"):
    """OverLoCK's ContMix (arXiv 2502.20087, Sec. 3.3) from projected tensors, one pixel row at a time:
    ``aff[p, g, r] = sum_d q[p, g, d] k[r, g, d]`` (pixel to region centre), ``logits = aff W^T + b`` (one logit
    per kernel offset of every branch), ``+ rpb[g, offset]``, ``Ker = softmax`` per branch,
    ``out[p, c] = sum_o Ker[p, g(c), o] v[window(p) + o, c]``; branch ``i`` owns the ``i``-th equal chunk of the
    channels of ``v``. ``q (B, Y, X, G, D)``, ``k (B, R, G, D)``, ``v (B, Y, X, C)``."""
    wt = _work(v)
    q, k, v = q.to(wt), k.to(wt), v.to(wt)
    B, Y, X, G, _ = q.shape
    C = v.shape[-1]
    per = C // len(kernel_sizes)
    aff = torch.einsum("byxgd,brgd->byxgr", q, k)  # (B, Y, X, G, R)
    logits = torch.einsum("byxgr,or->byxgo", aff, proj_weight.to(wt))  # (B, Y, X, G, sum k^2)
    if proj_bias is not None:
        logits = logits + proj_bias.to(wt)
    outs, at = [], 0
    for n, ks in enumerate(kernel_sizes):
        lg = logits[..., at:at + ks * ks]  # (B, Y, X, G, k^2)
        at += ks * ks
        vb = v[..., n * per:(n + 1) * per].reshape(B, Y, X, G, per // G)  # (B, Y, X, G, C_b / G)
        out = torch.zeros_like(vb)
        for y in range(Y):
            sy = _window_start(y, Y, ks, border)
            for x in range(X):
                sx = _window_start(x, X, ks, border)
                lp = lg[:, y, x]  # (B, G, k^2)
                if rpb is not None and rpb[n] is not None:
                    bias = torch.stack([rpb[n][:, sy + i - y + ks - 1, sx + j - x + ks - 1].to(wt)
                                        for i in range(ks) for j in range(ks)], -1)  # (G, k^2)
                    lp = lp + bias
                w = _softmax(lp, -1)  # (B, G, k^2)
                acc = torch.zeros(B, G, per // G, dtype=wt)
                for i in range(ks):
                    for j in range(ks):
                        yy, xx = sy + i, sx + j
                        if 0 <= yy < Y and 0 <= xx < X:  # zero outside the image
                            acc = acc + w[:, :, i * ks + j, None] * vb[:, yy, xx]
                out[:, y, x] = acc
        outs.append(out.reshape(B, Y, X, per))
    return torch.cat(outs, -1).to(v.dtype)


def _adaptive_avg_pool(z, S):
    """``nn.AdaptiveAvgPool2d(S)`` on ``(B, Y, X, C)``: region ``(i, j)`` averages rows ``[floor(i Y / S),
    ceil((i + 1) Y / S))`` and the matching columns; returns ``(B, S * S, C)``."""
    Y, X = z.shape[1:3]
    cells = []
    for i in range(S):
        y0, y1 = (i * Y) // S, -((-(i + 1) * Y) // S)
        for j in range(S):
            x0, x1 = (j * X) // S, -((-(j + 1) * X) // S)
            cells.append(z[:, y0:y1, x0:x1].mean((1, 2)))
    return torch.stack(cells, 1)


def naive_contmix_module(module, x, context=None):
    """The ``ContMix`` module: projections (1x1 conv = per-pixel linear, then BatchNorm over every pixel),
    queries from ``x``, keys from the region-pooled ``context`` (``x`` when None), then :func:`naive_contmix`."""
    wt = _work(x)
    xw = x.to(wt)
    z = xw if context is None else context.to(wt)
    P = {n: p.to(wt) for n, p in module.named_parameters()}
    B, Y, X, C = x.shape
    G = module.num_heads

    def proj(t, name, bn):
        t = torch.einsum("...i,oi->...o", t, P[f"{name}.weight"])
        return naive_batch_norm(t, (bn.running_mean, bn.running_var, P[f"{bn_name[name]}.weight"],
                                    P[f"{bn_name[name]}.bias"]), module.training, _bn_momentum(bn), bn.eps,
                                channel_dim=t.dim() - 1)

    bn_name = {"query": "query_norm", "key": "key_norm", "value": "value_norm", "out": "out_norm"}
    q = proj(xw, "query", module.query_norm) * module.scale  # (B, Y, X, C/2)
    keys = proj(_adaptive_avg_pool(z, module.regions), "key", module.key_norm)  # (B, S^2, C/2)
    v = proj(xw, "value", module.value_norm) if module.value is not None else xw
    rpb = None if module.rpb is None else tuple(P[f"rpb.{n}"] for n in range(len(module.kernel_sizes)))
    mixed = naive_contmix(q.reshape(B, Y, X, G, -1), keys.reshape(B, -1, G, C // (2 * G)), v, P["proj.weight"],
                          P["proj.bias"], module.kernel_sizes, rpb, module.border)
    return proj(mixed, "out", module.out_norm).to(x.dtype)
