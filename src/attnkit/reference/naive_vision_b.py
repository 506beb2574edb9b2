"""Naive twins of the NiNformer, CrossFormer and MAXIM cross-gating token mixers: the ops and the module
forwards (``mechanisms/vision_{ninformer,crossformer,maxim_cross}.py``), written from each paper's equations.

Images are channels-last ``(B, Y, X, C)``; heads-last ``(B, Y, X, H, D)``. Imports only torch and the other
naive references.

Papers: NiNformer arXiv 2403.02411 §3; CrossFormer 2108.00154 §3.2 (LSDA, dynamic position bias); MAXIM
2201.02973 §3.2 (cross-gating block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.reference.naive_vision import _layer_norm, _linear, naive_axis_token_mixing

# ---------------------------------------------------------------------------------------- NiNformer


def naive_token_mixing_mlp(x, w1, b1, w2, b2):
    """``x (B, N, C)``: per channel ``c``, ``out[:, c] = W2 GELU(W1 x[:, c] + b1) + b2`` over the N tokens."""
    C = x.shape[-1]
    out = torch.empty_like(x)
    for c in range(C):
        col = x[:, :, c]                                   # (B, N): one channel's token vector
        hid = F.gelu(col @ w1.T + b1)                      # (B, d)
        out[:, :, c] = hid @ w2.T + b2                     # (B, N)
    return out


def naive_ninformer_module(m, x):
    """``NiNformerGating``: ``Linear(u) * MixerBlock(u)``, MixerBlock = token-MLP and channel-MLP residual pair."""
    B, Y, X, C = x.shape
    u = x.reshape(B, Y * X, C)                                                         # (B, N, C)
    tm = m.token_mlp
    v = u + naive_token_mixing_mlp(_layer_norm(m.token_norm, u), tm[0].weight, tm[0].bias, tm[2].weight, tm[2].bias)
    v = v + _linear(m.channel_mlp[2], F.gelu(_linear(m.channel_mlp[0], _layer_norm(m.channel_norm, v))))
    return (_linear(m.gate, u) * v).reshape(B, Y, X, C)


# ---------------------------------------------------------------------------------------- CrossFormer


def _group_and_slot(y, x, size, mode):
    """Group id and (slot_y, slot_x) of pixel ``(y, x)``: short = adjacent ``G x G``, long = stride ``I``."""
    sy, sx = size
    if mode == "short":
        return (y // sy, x // sx), (y % sy, x % sx)
    return (y % sy, x % sx), (y // sy, x // sx)


def naive_lsda(q, k, v, size, mode, bias=None, pad=False, scale=None):
    """CrossFormer LSDA, pixel by pixel: each query attends to the real pixels of its own group.

    ``q, k (B, Y, X, H, D)``, ``v (B, Y, X, H, Dv)``; ``size (sy, sx)``; ``bias (H, n, n)`` indexed by row-major
    slots in groups of ``gh x gw`` slots (``G x G`` short, ``ceil(Y/I) x ceil(X/I)`` long). ``pad`` only changes
    the group extents; padded pixels are never keys (their weight is exactly zero here).
    """
    Y, X, D = q.shape[1], q.shape[2], q.shape[-1]
    sx = size[1]
    gw = sx if mode == "short" else math.ceil(X / sx)
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    pixels = [(y, x) for y in range(Y) for x in range(X)]
    for y, x in pixels:
        g, (ty, tx) = _group_and_slot(y, x, size, mode)
        keys = [(yy, xx) for yy, xx in pixels if _group_and_slot(yy, xx, size, mode)[0] == g]
        kk = torch.stack([k[:, yy, xx] for yy, xx in keys], 1)                       # (B, m, H, D)
        vv = torch.stack([v[:, yy, xx] for yy, xx in keys], 1)                       # (B, m, H, Dv)
        logits = torch.einsum("bhd,bmhd->bhm", q[:, y, x], kk) * scale
        if bias is not None:
            t = ty * gw + tx
            slots = [s[0] * gw + s[1] for s in (_group_and_slot(yy, xx, size, mode)[1] for yy, xx in keys)]
            logits = logits + bias[:, t, slots]
        out[:, y, x] = torch.einsum("bhm,bmhd->bhd", torch.softmax(logits, -1), vv)
    return out


def naive_dynamic_position_bias(dpb, gh, gw):
    """CrossFormer's DPB evaluated at every (query slot, key slot) pair: ``(H, n, n)``, the MLP applied to the
    offset ``(ty - sy, tx - sx)`` of the two slots in a ``gh x gw`` group."""
    ty, tx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ty, tx = ty.reshape(-1), tx.reshape(-1)
    dtype = dpb.pos_proj.weight.dtype
    off = torch.stack([ty[:, None] - ty[None, :], tx[:, None] - tx[None, :]], -1).to(dtype)   # (n, n, 2)
    h = _linear(dpb.pos_proj, off)
    for block in (dpb.pos1, dpb.pos2, dpb.pos3):
        z = _linear(block[2], torch.relu(_layer_norm(block[0], h)))
        h = h + z if dpb.residual and block is not dpb.pos3 else z
    return h.permute(2, 0, 1)                                                          # (H, n, n)


def naive_crossformer_module(m, x):
    """``CrossFormerLSDA``: ``Linear(C, 3C)`` -> SDA or LDA with the DPB bias -> ``Linear(C, C)``."""
    B, Y, X, C = x.shape
    H = m.num_heads
    mode, size, (gh, gw) = m.plan(Y, X)
    qkv = _linear(m.qkv, x).reshape(B, Y, X, 3, H, C // H)
    bias = naive_dynamic_position_bias(m.pos, gh, gw) if m.pos is not None else None
    out = naive_lsda(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], size, mode, bias, m.pad)
    return _linear(m.proj, out.reshape(B, Y, X, C))


# ---------------------------------------------------------------------------------------- MAXIM


def naive_multi_axis_spatial_weights(u, grid_weight, grid_bias, grid_size, block_weight, block_bias, block_size):
    """``u (B, Y, X, 2C)``: grid-group dense layer on the first channel half, block dense layer on the second."""
    C = u.shape[-1] // 2
    grid = naive_axis_token_mixing(u[..., :C], grid_weight, grid_bias, grid_size, "grid")
    block = naive_axis_token_mixing(u[..., C:], block_weight, block_bias, block_size, "block")
    return torch.cat([grid, block], -1)


def naive_spatial_gating_weights(g, z):
    """MAXIM's ``GetSpatialGatingWeights``: LN -> Dense(C, 2C) -> GELU -> (grid dense | block dense) -> Dense(2C, C)."""
    u = F.gelu(_linear(g.in_proj, _layer_norm(g.norm, z)))
    w = naive_multi_axis_spatial_weights(u, g.grid_weight, g.grid_bias, g.grid_size, g.block_weight, g.block_bias,
                                         g.block_size)
    return _linear(g.out_proj, w)


def naive_maxim_cross_gating_module(m, x, y=None, *, return_both=False):
    """``MaximCrossGating``: each stream gates the other's projected features with its multi-axis weights."""
    y = x if y is None else y
    x0, y0 = _linear(m.proj_x, x), _linear(m.proj_y, y)                               # shortcuts
    x1 = F.gelu(_linear(m.in_x, _layer_norm(m.norm_x, x0)))
    y1 = F.gelu(_linear(m.in_y, _layer_norm(m.norm_y, y0)))
    gx, gy = naive_spatial_gating_weights(m.gate_x, x1), naive_spatial_gating_weights(m.gate_y, y1)
    y_out = y0 + _linear(m.out_y, y1 * gx)
    x_out = x0 + _linear(m.out_x, x1 * gy)
    if m.aggregate:
        x_out = x_out + y_out
    return (x_out, y_out) if return_both else x_out
