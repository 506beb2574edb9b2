"""Naive module twins of HAT, MAXIM, OverLoCK and CrossFormer token mixers (``mechanisms/vision_{hat,maxim,
overlock,crossformer}.py``), written from each paper's equations with explicit loops and einsums.

Images are channels-last ``(B, Y, X, C)``. Imports only torch and the other naive references.

Papers: HAT arXiv 2205.04437 §3.2-3.3; MAXIM 2201.02973 §3.1-3.2; OverLoCK 2502.20087 §3.3; CrossFormer
2108.00154 §3.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.reference.naive_vision import (
    _layer_norm,
    _linear,
    _shifted,
    naive_axis_token_mixing,
    naive_channel_gate,
    naive_overlapping_window_attention,
)


def naive_conv_same(x, weight, bias=None):
    """Dense 'same' convolution with zero padding: ``x (B, Y, X, Cin)``, ``weight (Cout, Cin, k, k)`` (odd k)."""
    k = weight.shape[-1]
    r = k // 2
    out = torch.zeros(*x.shape[:3], weight.shape[0], dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            out = out + torch.einsum("byxi,oi->byxo", _shifted(x, i - r, j - r), weight[:, :, i, j])
    return out if bias is None else out + bias


# --------------------------------------------------------------------------------------------- HAT


def naive_hat_channel_module(m, x):
    """``HATChannelAttention``: conv3x3 -> GELU -> conv3x3 -> ``y * sigmoid(W2 relu(W1 mean(y)))``."""
    y = naive_conv_same(x, m.conv1.weight, m.conv1.bias)
    y = naive_conv_same(F.gelu(y), m.conv2.weight, m.conv2.bias)
    return naive_channel_gate(y, m.squeeze.weight, m.squeeze.bias, m.excite.weight, m.excite.bias)


def naive_oca_bias(table, M, Mo):
    """HAT's OCA bias ``(H, M*M, Mo*Mo)``: query ``t`` at ``(ty, tx)`` in its window, key ``s`` at ``(sy, sx)``
    in its patch; ``r = s - t + (M - Mo + 1)`` per axis, entry ``table[(r_y S + r_x) mod S^2]``, ``S = M + Mo - 1``."""
    S = M + Mo - 1
    out = torch.zeros(table.shape[1], M * M, Mo * Mo, dtype=table.dtype)
    for t in range(M * M):
        for s in range(Mo * Mo):
            ry = s // Mo - t // M + M - Mo + 1
            rx = s % Mo - t % M + M - Mo + 1
            out[:, t, s] = table[(ry * S + rx) % (S * S)]
    return out


def naive_hat_ocab_module(m, x):
    """``HATOverlappingCrossAttention``: qkv -> overlapping window attention with the OCA bias -> proj."""
    B, Y, X, C = x.shape
    H = m.num_heads
    qkv = _linear(m.qkv, x).reshape(B, Y, X, 3, H, C // H)
    bias = naive_oca_bias(m.relative_position_bias_table, m.window_size, m.overlap_size)
    out = naive_overlapping_window_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                                             m.window_size, m.overlap_size, bias, m.mask_padded_keys)
    return _linear(m.proj, out.reshape(B, Y, X, C))


# ------------------------------------------------------------------------------------------- MAXIM


def _naive_gmlp(z, gate, size, axis):
    h = z.shape[-1] // 2
    z1, z2 = z[..., :h], z[..., h:]
    return z1 * naive_axis_token_mixing(_layer_norm(gate.norm, z2), gate.weight, gate.bias, size, axis)


def naive_maxim_gmlp_module(m, x):
    """``MaximGatedMLP``: LN -> dense -> GELU -> (block gMLP | grid gMLP) -> dense."""
    C = m.dim
    u = F.gelu(_linear(m.in_proj, _layer_norm(m.norm, x)))
    local = _naive_gmlp(u[..., :C], m.local_gate, m.block_size, "block")
    glob = _naive_gmlp(u[..., C:], m.global_gate, m.grid_size, "grid")
    return _linear(m.out_proj, torch.cat([local, glob], dim=-1))
