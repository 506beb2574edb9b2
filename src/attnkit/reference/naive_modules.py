"""Naive twins of the registered modules: ``naive_<name>(module, *inputs)`` is ``module(*inputs)``.

Each twin reads the module's own parameters and configuration and recomputes its forward with
plain tensor code (``F.linear``, hand-written norms and convolutions as ``F.conv*``) and the naive
op twins of :mod:`attnkit.reference`: every attention is a materialised score matrix with an
explicit element mask and bias. They never call the op or the backends the module uses, so the
generic registry tests can compare the two in float64, float32 and bfloat16. Masks and routes are
built from detached values, as the modules do. Imports only torch and ``attnkit.reference``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.reference.naive_dense import (
    causal_dense,
    naive_attention,
    naive_gaam,
    naive_lssa,
    naive_masked_attention,
    naive_relative_attention,
)
from attnkit.reference.naive_linear import naive_linear_attention
from attnkit.reference.naive_neighborhood import naive_neighborhood_attention
from attnkit.reference.naive_per_head import naive_moa_mask, naive_moh_gates, naive_s2_mask
from attnkit.reference.naive_routed import (
    naive_biformer,
    naive_block_ids,
    naive_hyper_attention,
    naive_moba,
    naive_psa_importance,
    naive_psa_levels,
    naive_pyramid_attention,
    naive_vmoba,
)


def _lin(layer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _split_qkv(layer, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """``x (B, N, C)`` -> q, k, v ``(B, N, H, C // H)`` from one ``Linear(C, 3C)``."""
    B, N, C = x.shape
    return _lin(layer, x).view(B, N, 3, heads, C // heads).unbind(2)  # (B, N, H, D) each


def _layer_norm(ln, x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------- dense


def naive_mha(m, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.mha.MultiHeadAttention`: ``x (B, N, C)``, ``context (B, M, C)``."""
    ctx = x if context is None else context
    B, N, _ = x.shape
    M = ctx.shape[1]
    q = _lin(m.q_proj, x).view(B, N, m.num_heads, m.head_dim)  # (B, N, Hq, D)
    k, v = _lin(m.kv_proj, ctx).view(B, M, 2, m.num_kv_heads, m.head_dim).unbind(2)  # (B, M, Hkv, D)
    if m.mask is not None:
        allowed = m.mask.to_dense(N, M)
    else:
        allowed = causal_dense(N, M) if m.causal else None  # top-left aligned
    return _lin(m.out_proj, naive_attention(q, k, v, allowed).reshape(B, N, -1))


def naive_rcmha(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.rcmha.RCMHA`: depthwise ``F.conv1d`` on q, k, v, then relative attention."""
    B, N, C = x.shape
    H, D, kk = m.num_heads, m.head_dim, m.kernel_size - 1
    left = kk if m.causal else kk // 2

    def conv(cv, t):  # t (B, N, H, D): one depthwise kernel along N shared by the heads
        tt = t.permute(0, 2, 3, 1).reshape(B * H, D, N)  # (B*H, D, N)
        out = F.conv1d(F.pad(tt, (left, kk - left)), cv.weight, cv.bias, groups=D)  # (B*H, D, N)
        return out.view(B, H, D, N).permute(0, 3, 1, 2)  # (B, N, H, D)

    q, k, v = (conv(cv, _lin(w, x).view(B, N, H, D)) for cv, w in zip(m.convs, (m.wq, m.wk, m.wv)))
    o = naive_relative_attention(q, k, v, m.u, m.rel_k, m.rel_b, causal=m.causal)  # (B, N, H, D)
    return _lin(m.proj, o.reshape(B, N, C))


def naive_softplus_attention(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.softplus_attention.SoftplusAttention` (LSSA / LSSAR)."""
    B, N, C = x.shape
    q, k, v = _split_qkv(m.qkv, x, m.num_heads)
    o = naive_lssa(q, k, v, causal=m.causal, p=m.p, offset=m.offset)
    return _lin(m.proj, o.reshape(B, N, C))


def naive_gaussian_adaptive(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.gaussian_adaptive.GaussianAdaptiveAttention` (GAAM)."""
    return naive_gaam(x, m.offsets, m.widths, m.mix_logits, axis=m.axis, normalize=m.mix_logits is not None,
                      eps=m.eps)


# -------------------------------------------------------------------------------------------- vision


def naive_single_head(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.single_head.SingleHeadAttention` (SHSA) on ``x (B, Y, X, C)``."""
    B, Y, X, C = x.shape
    x1, x2 = x.split([m.partial_dim, C - m.partial_dim], dim=-1)
    mu = x1.mean((1, 2, 3), keepdim=True)  # GroupNorm with one group: statistics over (Y, X, C_p)
    var = (x1 - mu).pow(2).mean((1, 2, 3), keepdim=True)
    x1 = (x1 - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias
    x1 = x1.reshape(B, Y * X, 1, m.partial_dim)  # (B, N, 1, C_p)
    q, k = _lin(m.qk, x1).chunk(2, dim=-1)  # (B, N, 1, d_qk)
    o = naive_attention(q, k, _lin(m.v, x1))  # (B, N, 1, C_p)
    y = torch.cat([o.view(B, Y, X, -1), x2], dim=-1)  # (B, Y, X, C)
    return _lin(m.proj, torch.relu(y))


# -------------------------------------------------------------------------------------------- routed


def naive_moba_module(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.moba.MoBA`: routes from the paper's rule query by query."""
    B, N, C = x.shape
    q, k, v = _split_qkv(m.qkv, x, m.num_heads)
    o = naive_moba(q, k, v, m.block_size, m.topk, causal=m.causal, routing=m.routing)
    return _lin(m.proj, o.reshape(B, N, C))


def naive_vmoba_module(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.vmoba.VMoBAAttention` on ``x (B, T, Y, X, C)`` (or ``(B, N, C)`` with its grid)."""
    grid = tuple(x.shape[1:4]) if x.dim() == 5 else tuple(m.grid_shape)
    B, C = x.shape[0], x.shape[-1]
    xs = x.reshape(B, -1, C)  # (B, N, C) raster order
    q, k, v = _split_qkv(m.qkv, xs, m.num_heads)
    cfg = m.config
    ids = naive_block_ids(grid, m.mode, cfg.block_1d, cfg.block_2d, cfg.block_3d)  # (N,)
    o = naive_vmoba(q, k, v, ids, m.selection, m.threshold, m.topk)  # (B, N, H, D)
    return _lin(m.proj, o.reshape(B, -1, C)).view(x.shape)


def naive_pyramid_sparse(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.pyramid_sparse.PyramidSparseAttention`: importance -> levels -> pyramid."""
    B, N, C = x.shape
    cfg = m.config
    q, k, v = _split_qkv(m.qkv, x, m.num_heads)
    s = naive_psa_importance(q.detach(), k.detach(), cfg.block_q, cfg.block_kv, causal=cfg.causal)
    levels = naive_psa_levels(s, cfg.mask_ratios, causal=cfg.causal, block_q=cfg.block_q, block_kv=cfg.block_kv)
    o = naive_pyramid_attention(q, k, v, levels, cfg.block_q, cfg.block_kv, causal=cfg.causal)
    return _lin(m.proj, o.reshape(B, N, C))


def naive_hyper_module(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.hyper_attention.HyperAttention`: every example drawn from a generator seeded
    as the module's."""
    B, N, C = x.shape
    q, k, v = _split_qkv(m.qkv, x, m.num_heads)
    o = torch.cat([naive_hyper_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal=m.causal,
                                         generator=torch.Generator().manual_seed(m.seed), **m.kw)
                   for i in range(B)])  # (B, N, H, D)
    return _lin(m.proj, o.reshape(B, N, C))


def naive_biformer_module(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.biformer.BiLevelRoutingAttention` on ``x (B, Y, X, C)``, LCE included; a map
    that ``n_win`` does not divide is zero-padded at the bottom / right and the output cropped."""
    Y0, X0 = x.shape[1:3]
    pad_y, pad_x = (m.n_win - Y0 % m.n_win) % m.n_win, (m.n_win - X0 % m.n_win) % m.n_win
    x = torch.cat([x, x.new_zeros(x.shape[0], Y0, pad_x, x.shape[3])], 2)  # (B, Y0, X, C)
    x = torch.cat([x, x.new_zeros(x.shape[0], pad_y, x.shape[2], x.shape[3])], 1)  # (B, Y, X, C)
    B, Y, X, C = x.shape
    H = m.num_heads
    q, k, v = _lin(m.qkv, x).view(B, Y, X, 3, H, C // H).unbind(3)  # (B, Y, X, H, D)
    o = naive_biformer(q, k, v, m.n_win, m.topk).reshape(B, Y, X, C)
    if m.lce is not None:
        vc = v.reshape(B, Y, X, C).permute(0, 3, 1, 2)  # (B, C, Y, X)
        lce = F.conv2d(vc, m.lce.weight, m.lce.bias, padding=m.lce.kernel_size[0] // 2, groups=C)  # (B, C, Y, X)
        o = o + lce.permute(0, 2, 3, 1)  # (B, Y, X, C)
    return _lin(m.proj, o)[:, :Y0, :X0]


# ---------------------------------------------------------------------------------------------- head


def naive_moh(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.moh.MoHAttention`: every head, times its token-by-token gate."""
    B, N, C = x.shape
    q, k, v = _split_qkv(m.qkv, x, m.num_heads)
    o = naive_attention(q, k, v, causal_dense(N, N) if m.causal else None)  # (B, N, H, D)
    gates, _ = naive_moh_gates(x, m.w_h, m.w_s, m.w_r, m.topk)  # (B, N, H)
    return _lin(m.proj, (o * gates.unsqueeze(-1)).reshape(B, N, C))


def naive_moa(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.moa.MoA`: spans ``clamp(round(alpha + beta N), 1, N)``, element mask per head."""
    B, N, C = x.shape
    q, k, v = _split_qkv(m.qkv, x, m.num_heads)
    spans = [min(max(round(float(a) + float(b) * N), 1), N) for a, b in zip(m.alphas, m.betas)]
    o, _ = naive_masked_attention(q, k, v, naive_moa_mask(spans, m.sink, N))
    return _lin(m.proj, o.reshape(B, N, C))


def naive_s2(m, x: torch.Tensor) -> torch.Tensor:
    """:class:`~attnkit.mechanisms.s2_attention.S2Attention`: per-head element masks; dense heads last."""
    B, N, C = x.shape
    H = m.num_heads
    q, k, v = _split_qkv(m.qkv, x, H)
    allowed = naive_s2_mask(H, N, m.block_size, m.local_blocks, m.vert_stride, causal=m.causal)  # (1, H, N, N)
    if m.num_dense_heads:
        allowed[:, H - m.num_dense_heads:] = causal_dense(N, N) if m.causal else True
    o, _ = naive_masked_attention(q, k, v, allowed)
    return _lin(m.proj, o.reshape(B, N, C))


# --------------------------------------------------------------------------------------------- local


def _na_layer(m, x: torch.Tensor, dilation) -> torch.Tensor:
    spatial = x.shape[1:-1]
    q, k, v = _lin(m.qkv, x).view(x.shape[0], *spatial, 3, m.num_heads, m.head_dim).unbind(-3)  # (B, *S, H, D)
    o = naive_neighborhood_attention(q, k, v, m.kernel_size, dilation=dilation, stride=m.stride,
                                     is_causal=m.is_causal)
    return _lin(m.proj, o.reshape(x.shape))


def naive_neighborhood(m, x: torch.Tensor) -> torch.Tensor:
    """``NeighborhoodAttention1D/2D/3D`` on channels-last ``x (B, *S, C)``."""
    return _na_layer(m, x, m.dilation)


def naive_dilated_neighborhood(m, x: torch.Tensor) -> torch.Tensor:
    """``DilatedNeighborhoodAttention``: ``x = x + NA_l(LN(x))`` with ``"auto" = floor(extent / kernel)``."""
    spatial = tuple(x.shape[1:-1])
    ks = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * len(spatial)
    for layer, norm, d in zip(m.layers, m.norms, m.dilations):
        if d == "auto":
            d = tuple(max(1, n // kk) for n, kk in zip(spatial, ks))
        x = x + _na_layer(layer, _layer_norm(norm, x), d)
    return x


def naive_halo(m, x: torch.Tensor) -> torch.Tensor:
    """``HaloAttention`` on ``x (B, Y, X, C)``: one mask over the zero-padded map, relative logits per pair."""
    B, Y, X, C = x.shape
    H, D, b, h = m.num_heads, m.head_dim, m.block_size, m.halo_size
    q = _lin(m.q, x).view(B, Y * X, H, D)  # (B, N, H, D)
    k, v = _lin(m.kv, x).view(B, Y, X, 2, H, D).unbind(3)  # (B, Y, X, H, D)
    pad = (0, 0, 0, 0, h, h, h, h)  # padded keys are zero (masked below unless mask_padding=False)
    Yp, Xp = Y + 2 * h, X + 2 * h
    kp, vp = F.pad(k, pad).reshape(B, Yp * Xp, H, D), F.pad(v, pad).reshape(B, Yp * Xp, H, D)  # (B, Np, H, D)
    qy, qx = (t.reshape(-1, 1) for t in torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij"))
    ky, kx = (t.reshape(1, -1) - h for t in torch.meshgrid(torch.arange(Yp), torch.arange(Xp), indexing="ij"))
    y0, x0 = qy // b * b, qx // b * b  # the query's block corner; its window is [y0 - h, y0 + b + h)
    allowed = (ky >= y0 - h) & (ky < y0 + b + h) & (kx >= x0 - h) & (kx < x0 + b + h)  # (N, Np)
    if m.mask_padding:
        allowed &= (ky >= 0) & (ky < Y) & (kx >= 0) & (kx < X)
    n_rel = m.rel_h.shape[0]
    iy = (ky - qy + b + h - 1).clamp(0, n_rel - 1)  # true offset key - query, shifted to a table row
    ix = (kx - qx + b + h - 1).clamp(0, n_rel - 1)
    rel = m.rel_h[iy] + m.rel_w[ix]  # (N, Np, D), shared by heads
    bias = torch.einsum("bqhd,qkd->bhqk", q, rel)  # position logits are not scaled
    o, _ = naive_masked_attention(q, kp, vp, allowed, None, bias)  # (B, N, H, D)
    return _lin(m.proj, o.reshape(B, Y, X, C))


def _naive_multi_axis(m, x: torch.Tensor) -> torch.Tensor:
    """One MaxViT ``_RelAttention`` (block or grid) on ``x (B, Y, X, C)`` as a masked dense attention."""
    B, Y, X, C = x.shape
    H, M = m.num_heads, m.size
    q, k, v = _lin(m.qkv, x).view(B, Y * X, 3, H, C // H).unbind(2)  # (B, N, H, D)
    yy, xx = (t.reshape(-1) for t in torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij"))
    if m.kind == "block":  # window (y div P, x div P), slot (y mod P, x mod P)
        gy, gx, sy, sx = yy // M, xx // M, yy % M, xx % M
    else:  # group (y mod Y/G, x mod X/G), slot (y div Y/G, x div X/G)
        gy, gx, sy, sx = yy % (Y // M), xx % (X // M), yy // (Y // M), xx // (X // M)
    allowed = (gy[:, None] == gy[None, :]) & (gx[:, None] == gx[None, :])  # (N, N)
    idx = (sy[:, None] - sy[None, :] + M - 1) * (2 * M - 1) + (sx[:, None] - sx[None, :] + M - 1)
    bias = m.table[idx].permute(2, 0, 1)  # (H, N, N)
    o, _ = naive_masked_attention(q, k, v, allowed, None, bias)
    return _lin(m.proj, o.reshape(B, Y, X, C))


def naive_maxvit(m, x: torch.Tensor) -> torch.Tensor:
    """``MultiAxisAttention``: ``Grid(Block(x))``, no norm, no residual."""
    return _naive_multi_axis(m.grid, _naive_multi_axis(m.block, x))


def naive_criss_cross(m, x: torch.Tensor) -> torch.Tensor:
    """``CrissCrossAttention`` on ``x (B, C, Y, X)``: the row-or-column mask, no scaling, ``gamma * out + x``."""
    B, _, Y, X = x.shape
    H = m.num_heads
    yy, xx = (t.reshape(-1) for t in torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij"))
    allowed = (yy[:, None] == yy[None, :]) | (xx[:, None] == xx[None, :])  # (N, N): the centre once

    def heads(conv, t):  # 1x1 conv (B, C, Y, X) -> (B, N, H, D)
        y = torch.einsum("bcyx,oc->byxo", t, conv.weight[:, :, 0, 0]) + conv.bias  # (B, Y, X, C')
        return y.reshape(B, Y * X, H, -1)

    for _ in range(m.recurrence):
        o, _ = naive_masked_attention(heads(m.query, x), heads(m.key, x), heads(m.value, x), allowed, 1.0)
        x = m.gamma * o.reshape(B, Y, X, -1).permute(0, 3, 1, 2) + x  # (B, C, Y, X)
    return x


# -------------------------------------------------------------------------------------------- linear


def naive_linear_module(m, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """``LinearAttention`` (Katharopoulos): ``x (B, N, C)``, optional ``context (B, M, C)``."""
    c = m.config
    ctx = x if context is None else context
    B, N, C = x.shape
    q = _lin(m.q, x).view(B, N, c.num_heads, C // c.num_heads)  # (B, N, H, D)
    k, v = _lin(m.kv, ctx).view(B, ctx.shape[1], 2, c.num_heads, C // c.num_heads).unbind(2)  # (B, M, H, D)
    o = naive_linear_attention(q, k, v, causal=c.causal, feature_map=c.feature_map, normalize=c.normalize,
                               scale=1.0, eps=c.eps)
    return _lin(m.out, o.reshape(B, N, C))


def naive_l2vit(m, x: torch.Tensor) -> torch.Tensor:
    """``L2ViTAttention`` (LGA): ``tau * phi(Q)(phi(K)^T V) / max(phi(Q) . sum phi(k), clamp)``, phi = ReLU."""
    B, Y, X, C = x.shape
    q, k, v = _split_qkv(m.qkv, x.reshape(B, Y * X, C), m.num_heads)
    num = naive_linear_attention(q, k, v, causal=False, feature_map="relu", scale=1.0)
    den = naive_linear_attention(q, k, torch.ones_like(v[..., :1]), causal=False, feature_map="relu", scale=1.0)
    o = m.temperature[:, None] * num / den.clamp_min(m.clamp_min)  # (B, N, H, D)
    return _lin(m.out, o.reshape(B, Y, X, C))


def naive_care(m, x: torch.Tensor) -> torch.Tensor:
    """``CAREAttention`` global branch: elu+1, mean normaliser (sum normaliser with eps * N), V = x."""
    B, Y, X, C = x.shape
    N, D = Y * X, m.head_dim
    q, k = _lin(m.qk, x).view(B, N, 2, C // D, D).unbind(2)  # (B, N, H, d_att)
    o = naive_linear_attention(q, k, x.reshape(B, N, C // D, D), causal=False, feature_map="elu+1",
                               normalize=True, scale=1.0, eps=m.eps * N)
    return o.reshape(B, Y, X, C)


def naive_lightning(m, x: torch.Tensor) -> torch.Tensor:
    """``LightningAttention`` (TNL, or MiniMax with ``style="minimax"``): causal decayed linear attention."""
    c = m.config
    B, N, _ = x.shape
    H, D = c.num_heads, c.head_dim
    if c.style == "tnl":
        q, k, v, u = _lin(m.qkvu, x).chunk(4, dim=-1)  # (B, N, H*D) each
        q, k = F.silu(q), F.silu(k)
    else:
        q, k, v = F.silu(_lin(m.qkv, x)).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, H, D) for t in (q, k, v))  # (B, N, H, D)
    a = naive_linear_attention(q, k, v, causal=True, decay=m.decay.to(x.dtype), scale=1.0)
    a = _rms(a.reshape(B, N, H * D), c.eps)  # one norm over all heads
    o = a * u if c.style == "tnl" else a * m.norm_weight * torch.sigmoid(_lin(m.gate, x))
    return _lin(m.out, o)


def naive_hybrid(m, x: torch.Tensor) -> torch.Tensor:
    """``HybridAttention``: causal softmax heads and decayed linear heads (SiLU q, k), RMS x gain fusion."""
    B, N, C = x.shape
    H = m.num_heads
    q, k, v = _split_qkv(m.qkv, x, H)
    heads = [None] * H
    if m.softmax_heads:
        ix = list(m.softmax_heads)
        o = naive_attention(q[:, :, ix], k[:, :, ix], v[:, :, ix], causal_dense(N, N))
        for j, h in enumerate(ix):
            heads[h] = o[:, :, j]
    if m.linear_heads:
        ix = list(m.linear_heads)
        o = naive_linear_attention(F.silu(q[:, :, ix]), F.silu(k[:, :, ix]), v[:, :, ix], causal=True,
                                   decay=m.decay.to(x.dtype))  # scale D^-1/2
        for j, h in enumerate(ix):
            heads[h] = o[:, :, j]
    o = torch.stack(heads, dim=2)  # (B, N, H, D), original head order
    if m.gain is not None:
        o = _rms(o, 1e-6) * m.gain[:, None]
    return _lin(m.out, o.reshape(B, N, C))


def naive_agent(m, x: torch.Tensor) -> torch.Tensor:
    """``AgentAttention`` (2-D ``(B, h, w, C)`` or 1-D ``(B, N, C)``): two masked softmaxes and the DWC."""
    c = m.config
    size = tuple(x.shape[1:-1])
    B, C = x.shape[0], x.shape[-1]
    N, H, D, n = math.prod(size), c.num_heads, C // c.num_heads, c.num_agents
    q, k, v = _lin(m.qkv, x.reshape(B, N, C)).chunk(3, dim=-1)  # (B, N, C) each
    if len(size) == 2:
        side = math.isqrt(n)
        a = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(B, C, *size), (side, side))  # (B, C, s, s)
    else:
        a = F.adaptive_avg_pool1d(q.transpose(1, 2), n)  # (B, C, n)
    a = a.reshape(B, C, n).transpose(1, 2).reshape(B, n, H, D)  # (B, n, H, D)
    b1 = b2 = None
    if c.agent_bias:
        if len(size) == 1:
            b1 = F.interpolate(m.an_bias, size=size, mode="linear")  # (H, n, N)
            b2 = F.interpolate(m.na_bias, size=size, mode="linear").transpose(1, 2)  # (H, N, n)
        else:
            def rs(p, s):
                return p if tuple(p.shape[-2:]) == s else F.interpolate(p, size=s, mode="bilinear")

            h, w = size
            b1 = (rs(m.an_bias, (h, w)) + rs(m.ah_bias, (h, 1)) + rs(m.aw_bias, (1, w))).reshape(H, n, N)
            b2 = (rs(m.na_bias, (h, w)) + rs(m.ha_bias, (h, 1)) + rs(m.wa_bias, (1, w))).reshape(H, n, N)
            b2 = b2.transpose(1, 2)  # (H, N, n)
    qh, kh, vh = (t.reshape(B, N, H, D) for t in (q, k, v))
    va, _ = naive_masked_attention(a, kh, vh, None, None, b1)  # (B, n, H, D): agents read every key
    o, _ = naive_masked_attention(qh, a, va, None, None, b2)  # (B, N, H, D): queries read the agents
    o = o.reshape(B, N, C)
    if m.dwc is not None:
        vg = v.transpose(1, 2).reshape(B, C, *size)  # (B, C, h, w) or (B, C, N)
        conv = F.conv2d if len(size) == 2 else F.conv1d
        o = o + conv(vg, m.dwc.weight, m.dwc.bias, padding=1, groups=C).reshape(B, C, N).transpose(1, 2)
    return _lin(m.proj, o).reshape(x.shape)
