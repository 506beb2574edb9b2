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


def _work(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _f(t, wt):
    return None if t is None else t.to(wt)


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
