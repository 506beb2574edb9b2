"""Naive references of the vision token mixers (``ops/vision``) and of their modules (``mechanisms/vision_*``).

Obvious code only, written from each paper's equations: explicit shifts instead of convolutions, explicit
loops over windows and groups instead of partitions, einsum for every contraction. Images are channels-last
``(B, Y, X, C)``; attention tensors heads-last ``(B, Y, X, H, D)``. Imports only torch.

Papers: FocalNets arXiv 2203.11926; PoolFormer 2111.11418; NiNformer 2403.02411; HAT 2205.04437; DaViT
2204.03645; GC ViT 2206.09959; CrossFormer 2108.00154; MAXIM 2201.02973; OverLoCK 2502.20087.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.reference.naive_dense import naive_masked_attention

# ------------------------------------------------------------------------------------------ op twins


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[:, y, x] = x[:, y + dy, x + dx]``, zero outside the image. ``x (B, Y, X, ...)``."""
    Y, X = x.shape[1:3]
    out = torch.zeros_like(x)
    ys, ye = max(0, -dy), min(Y, Y - dy)
    xs, xe = max(0, -dx), min(X, X - dx)
    if ys < ye and xs < xe:
        out[:, ys:ye, xs:xe] = x[:, ys + dy:ye + dy, xs + dx:xe + dx]
    return out


def naive_depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' convolution, zero padding, no bias: ``x (B, Y, X, C)``, ``weight (C, 1, k, k)`` (odd k)."""
    k = weight.shape[-1]
    r = k // 2
    out = torch.zeros_like(x)
    for i in range(k):
        for j in range(k):
            out = out + _shifted(x, i - r, j - r) * weight[:, 0, i, j]
    return out


def naive_pool_mixer(x: torch.Tensor, pool_size: int = 3) -> torch.Tensor:
    """PoolFormer (arXiv 2111.11418 §3.2): mean over the ``pool_size^2`` window inside the image, minus ``x``.

    ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``; the divisor counts only pixels inside the image.
    """
    r = pool_size // 2
    total, count = torch.zeros_like(x), torch.zeros_like(x[..., :1])
    ones = torch.ones_like(x[..., :1])
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            total = total + _shifted(x, dy, dx)
            count = count + _shifted(ones, dy, dx)
    return total / count - x


def naive_focal_modulation(q, ctx, gates, focal_weights, h_weight, h_bias=None, normalize=False):
    """FocalNets (arXiv 2203.11926 §3.2): ``q * h(sum_l gate_l z_l)`` with hierarchical depthwise contexts.

    ``z_l = GELU(DWConv_l(z_{l-1}))`` from ``z_0 = ctx``; ``z_{L+1} = GELU(mean_{y,x} z_L)``; ``gates
    (B, Y, X, L+1)``; ``h`` a ``C x C`` linear map; ``normalize`` divides the sum by ``L + 1``.
    """
    z, total = ctx, torch.zeros_like(ctx)
    for level, w in enumerate(focal_weights):
        z = F.gelu(naive_depthwise_conv(z, w))
        total = total + z * gates[..., level:level + 1]
    glob = F.gelu(z.mean(dim=(1, 2), keepdim=True))
    total = total + glob * gates[..., len(focal_weights):]
    if normalize:
        total = total / (len(focal_weights) + 1)
    m = torch.einsum("byxc,oc->byxo", total, h_weight)
    if h_bias is not None:
        m = m + h_bias
    return q * m


def naive_channel_group_attention(q, k, v, scale=None):
    """DaViT (arXiv 2204.03645 §3.2), per group: ``A = softmax(Q^T K * scale)`` over key channels, ``out = V A^T``.

    ``q, k, v (B, P, G, Cg)``: each channel is a token whose feature vector is the whole image. Scale
    defaults to ``Cg ** -0.5``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a = torch.softmax(torch.einsum("bpga,bpgc->bgac", q, k) * scale, dim=-1)  # (B, G, Cg, Cg)
    return torch.einsum("bgac,bpgc->bpga", a, v)


def naive_global_query_window_attention(qg, k, v, window_size, bias=None, scale=None):
    """GC ViT (arXiv 2206.09959 §3.2): the image's ``h x w`` global queries attend inside every window.

    ``qg (B, h, w, H, D)``; ``k (B, Y, X, H, D)``; ``v (B, Y, X, H, Dv)``; window ``h = w``; query slot ``t``
    writes window position ``t``. ``bias (H, h*w, h*w)`` is added to the logits.
    """
    B, Y, X, H, D = k.shape
    M = window_size
    out = torch.zeros(B, Y, X, H, v.shape[-1], dtype=v.dtype)
    q = qg.reshape(B, M * M, H, D)
    for i in range(Y // M):
        for j in range(X // M):
            kw = k[:, i * M:(i + 1) * M, j * M:(j + 1) * M].reshape(B, M * M, H, D)
            vw = v[:, i * M:(i + 1) * M, j * M:(j + 1) * M].reshape(B, M * M, H, -1)
            b = None if bias is None else bias.unsqueeze(0)
            o, _ = naive_masked_attention(q, kw, vw, None, scale, b)
            out[:, i * M:(i + 1) * M, j * M:(j + 1) * M] = o.reshape(B, M, M, H, -1)
    return out


def naive_overlapping_window_attention(q, k, v, window_size, overlap_size, bias=None, mask_padded_keys=False,
                                       scale=None):
    """HAT's OCAB (arXiv 2205.04437 §3.3): each ``M x M`` query window attends the ``Mo x Mo`` key window
    centred on it, zero keys/values outside the image (skipped if ``mask_padded_keys``).

    ``q, k (B, Y, X, H, D)``; ``v (B, Y, X, H, Dv)``; ``bias (H, M*M, Mo*Mo)``.
    """
    B, Y, X, H, D = q.shape
    M, Mo = window_size, overlap_size
    p = (Mo - M) // 2
    kp = F.pad(k, (0, 0, 0, 0, p, p, p, p))  # (B, Y + 2p, X + 2p, H, D)
    vp = F.pad(v, (0, 0, 0, 0, p, p, p, p))
    inside = F.pad(torch.ones(Y, X, dtype=torch.bool), (p, p, p, p))
    out = torch.zeros(B, Y, X, H, v.shape[-1], dtype=v.dtype)
    for i in range(Y // M):
        for j in range(X // M):
            qw = q[:, i * M:(i + 1) * M, j * M:(j + 1) * M].reshape(B, M * M, H, D)
            kw = kp[:, i * M:i * M + Mo, j * M:j * M + Mo].reshape(B, Mo * Mo, H, D)
            vw = vp[:, i * M:i * M + Mo, j * M:j * M + Mo].reshape(B, Mo * Mo, H, -1)
            allowed = inside[i * M:i * M + Mo, j * M:j * M + Mo].reshape(1, 1, 1, -1) if mask_padded_keys else None
            b = None if bias is None else bias.unsqueeze(0)
            o, _ = naive_masked_attention(qw, kw, vw, allowed, scale, b)
            out[:, i * M:(i + 1) * M, j * M:(j + 1) * M] = o.reshape(B, M, M, H, -1)
    return out


def naive_axis_token_mixing(x, weight, bias, size, axis="block"):
    """MAXIM (arXiv 2201.02973 §3.1): a dense layer over the tokens of each block (``size x size`` window) or
    grid group (the ``size x size`` pixels spaced ``(Y/size, X/size)`` apart).

    ``x (B, Y, X, C)``; ``weight (n, n)``, ``bias (n,)`` with ``n = size^2``: ``out[t] = sum_s W[t, s] x[s] + b[t]``.
    """
    B, Y, X, C = x.shape
    out = torch.zeros_like(x)
    if axis == "block":
        groups = [(slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size))
                  for i in range(Y // size) for j in range(X // size)]
    else:
        sy, sx = Y // size, X // size
        groups = [(slice(a, Y, sy), slice(b, X, sx)) for a in range(sy) for b in range(sx)]
    for ys, xs in groups:
        tokens = x[:, ys, xs].reshape(B, size * size, C)
        mixed = torch.einsum("ts,bsc->btc", weight, tokens)
        if bias is not None:
            mixed = mixed + bias[:, None]
        out[:, ys, xs] = mixed.reshape(B, size, size, C)
    return out


def naive_dynamic_depthwise_conv(x, kernels, kernel_size):
    """OverLoCK ContMix aggregation (arXiv 2502.20087 §3.3): every pixel has its own ``k x k`` kernel per
    channel group; ``out[p, c] = sum_o K[p, g(c), o] x[p + o, c]``, zero padding.

    ``x (B, Y, X, C)``; ``kernels (B, Y, X, G, k*k)``; channel ``c`` is in group ``c // (C/G)``.
    """
    C = x.shape[-1]
    G = kernels.shape[3]
    k, r = kernel_size, kernel_size // 2
    out = torch.zeros_like(x)
    per = kernels.repeat_interleave(C // G, dim=3)  # (B, Y, X, C, k*k)
    for i in range(k):
        for j in range(k):
            out = out + _shifted(x, i - r, j - r) * per[..., i * k + j]
    return out


def naive_channel_gate(y, w1, b1, w2, b2):
    """Squeeze-and-excitation gate (HAT's channel attention, arXiv 2205.04437 §3.2):
    ``y * sigmoid(W2 relu(W1 mean_{Y,X}(y) + b1) + b2)``; ``y (B, Y, X, C)``, ``w1 (C/r, C)``, ``w2 (C, C/r)``."""
    s = y.mean(dim=(1, 2))  # (B, C)
    s = torch.relu(s @ w1.t() + b1)
    return y * torch.sigmoid(s @ w2.t() + b2)[:, None, None, :]


# --------------------------------------------------------------------------------------- module twins


def naive_pool_mixer_module(m, x: torch.Tensor) -> torch.Tensor:
    """``PoolMixer``: the window mean (pixels inside the image) minus ``x``."""
    return naive_pool_mixer(x, m.pool_size)


def _linear(layer, x):
    y = torch.einsum("...i,oi->...o", x, layer.weight)
    return y if layer.bias is None else y + layer.bias


def _layer_norm(norm, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + norm.eps)
    return y if norm.weight is None else y * norm.weight + norm.bias


def naive_focal_modulation_module(m, x: torch.Tensor) -> torch.Tensor:
    """``FocalModulation``: ``f`` -> (q, z0, gates) -> focal modulation -> [LayerNorm] -> ``proj``."""
    C, L = m.dim, m.focal_level
    f = _linear(m.f, x)
    q, ctx, gates = f[..., :C], f[..., C:2 * C], f[..., 2 * C:]
    y = naive_focal_modulation(q, ctx, gates, [c.weight for c in m.focal_layers], m.h.weight, m.h.bias,
                               m.normalize_modulator)
    assert gates.shape[-1] == L + 1
    if m.norm is not None:
        y = _layer_norm(m.norm, y)
    return _linear(m.proj, y)


def naive_davit_channel_module(m, x: torch.Tensor) -> torch.Tensor:
    """``DaViTChannelAttention``: qkv -> per group ``softmax(Q^T K / sqrt(Cg)) V`` (paper) or the official
    wiring ``softmax(K^T V / sqrt(Cg)) Q`` -> proj."""
    B, Y, X, C = x.shape
    G = m.num_heads
    qkv = _linear(m.qkv, x).reshape(B, Y * X, 3, G, C // G)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = naive_channel_group_attention(q, k, v) if m.wiring == "paper" else naive_channel_group_attention(k, v, q)
    return _linear(m.proj, out.reshape(B, Y, X, C))


def naive_davit_window_module(m, x: torch.Tensor) -> torch.Tensor:
    """``DaViTWindowAttention``: zero-pad to a multiple of the window, qkv, attention inside each window
    (padded tokens attended, not masked), crop, proj."""
    B, Y, X, C = x.shape
    w, H = m.window_size, m.num_heads
    Yp, Xp = -(-Y // w) * w, -(-X // w) * w
    xp = torch.zeros(B, Yp, Xp, C, dtype=x.dtype)
    xp[:, :Y, :X] = x
    qkv = _linear(m.qkv, xp).reshape(B, Yp, Xp, 3, H, C // H)
    out = torch.zeros(B, Yp, Xp, H, C // H, dtype=x.dtype)
    for i in range(Yp // w):
        for j in range(Xp // w):
            win = qkv[:, i * w:(i + 1) * w, j * w:(j + 1) * w].reshape(B, w * w, 3, H, C // H)
            o, _ = naive_masked_attention(win[:, :, 0], win[:, :, 1], win[:, :, 2])
            out[:, i * w:(i + 1) * w, j * w:(j + 1) * w] = o.reshape(B, w, w, H, C // H)
    return _linear(m.proj, out[:, :Y, :X].reshape(B, Y, X, C))


def _naive_relative_bias(table, M):
    """Swin bias ``(H, M*M, M*M)``: entry ``[h, t, s] = table[(dy + M - 1)(2M - 1) + dx + M - 1, h]``, ``d = t - s``."""
    H = table.shape[1]
    out = torch.zeros(H, M * M, M * M, dtype=table.dtype)
    for t in range(M * M):
        for s in range(M * M):
            dy, dx = t // M - s // M, t % M - s % M
            out[:, t, s] = table[(dy + M - 1) * (2 * M - 1) + dx + M - 1]
    return out


def _naive_max_pool(x):
    """MaxPool(3, stride 2, padding 1) on ``(B, Y, X, C)``, padding ignored."""
    B, Y, X, C = x.shape
    out = torch.zeros(B, (Y + 1) // 2, (X + 1) // 2, C, dtype=x.dtype)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            win = x[:, max(0, 2 * i - 1):2 * i + 2, max(0, 2 * j - 1):2 * j + 2]
            out[:, i, j] = win.amax(dim=(1, 2))
    return out


def naive_gcvit_global_module(m, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
    """``GCViTGlobalAttention``: generator (MBConv + max pools down to ``M x M``) -> global queries; kv;
    global-query window attention with the relative bias; proj."""
    B, Y, X, C = x.shape
    M, H = m.window_size, m.num_heads
    if q_global is None:
        z = x
        for block in m.generator:
            y = F.gelu(naive_depthwise_conv(z, block.dw))
            s = torch.sigmoid(_linear(block.se_fc2, F.gelu(_linear(block.se_fc1, y.mean(dim=(1, 2), keepdim=True)))))
            z = z + _linear(block.pw, y * s)
            if z.shape[1] > M:
                z = _naive_max_pool(z)
        while z.shape[1] > M:
            z = _naive_max_pool(z)
        q_global = z
    kv = _linear(m.kv, x).reshape(B, Y, X, 2, H, C // H)
    bias = _naive_relative_bias(m.relative_position_bias_table, M)
    out = naive_global_query_window_attention(q_global.reshape(B, M, M, H, C // H), kv[..., 0, :, :], kv[..., 1, :, :],
                                              M, bias)
    return _linear(m.proj, out.reshape(B, Y, X, C))
