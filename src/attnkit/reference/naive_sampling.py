"""Naive references of the sampling and pooling ops (``ops/sampling``) and their modules (``mechanisms/sampling_*``).

Deformable attention is written as the paper defines it: every sampling point reads its bilinear (2-D) or
trilinear (3-D, on the materialised depth x feature volume) neighbours one corner at a time, with zeros
outside the map and the pixel-centre convention (``align_corners=False``). Imports only torch.
"""

from __future__ import annotations

import torch


def _work(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _read(vol, b, h, idx, size):
    """``vol[b, idx..., h]`` with zeros where any index is outside ``[0, size)``; idx float tensors."""
    ok = torch.ones_like(idx[0], dtype=torch.bool)
    safe = []
    for i, n in zip(idx, size):
        ok = ok & (i >= 0) & (i < n)
        safe.append(i.clamp(0, n - 1).long())
    return vol[(b, *safe, h)] * ok[..., None]


def naive_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159, Eq. 3).

    ``out[b, q, h] = sum_{l, p} A[b, q, h, l, p] * bilinear(V_l[b, :, :, h], W_l x - 0.5, H_l y - 0.5)`` with
    ``(x, y) = sampling_locations[b, q, h, l, p]`` in ``[0, 1]``. value ``(B, S, H, D)``, ``S = sum H_l W_l``;
    returns ``(B, Nq, H, D)``.
    """
    wt = _work(value)
    B, _S, H, D = value.shape
    _, Nq, _, _L, _P, _ = sampling_locations.shape
    loc, attn, v = sampling_locations.to(wt), attention_weights.to(wt), value.to(wt)
    out = torch.zeros(B, Nq, H, D, dtype=wt)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, 1, H, 1)
    start = 0
    for lvl, (Hl, Wl) in enumerate(spatial_shapes):
        vl = v[:, start:start + Hl * Wl].reshape(B, Hl, Wl, H, D)  # (B, H_l, W_l, H, D)
        start += Hl * Wl
        u = loc[:, :, :, lvl, :, 0] * Wl - 0.5  # (B, Nq, H, P) column coordinate in pixels
        w = loc[:, :, :, lvl, :, 1] * Hl - 0.5
        x0, y0 = torch.floor(u), torch.floor(w)
        fx, fy = u - x0, w - y0
        sample = (_read(vl, b, h, (y0, x0), (Hl, Wl)) * ((1 - fx) * (1 - fy))[..., None]
                  + _read(vl, b, h, (y0, x0 + 1), (Hl, Wl)) * (fx * (1 - fy))[..., None]
                  + _read(vl, b, h, (y0 + 1, x0), (Hl, Wl)) * ((1 - fx) * fy)[..., None]
                  + _read(vl, b, h, (y0 + 1, x0 + 1), (Hl, Wl)) * (fx * fy)[..., None])  # (B, Nq, H, P, D)
        out = out + (sample * attn[:, :, :, lvl, :, None]).sum(3)
    return out.to(value.dtype)


def naive_deformable_attention_3d(value, depth, spatial_shapes, sampling_locations, attention_weights):
    """DFA3D (arXiv 2307.12972, Sec. 3): deformable attention on ``V_l[y, x, z] = depth_l[y, x, z] F_l[y, x]``.

    The volume is materialised and sampled trilinearly (8 corners, zeros outside, ``z = d Db - 0.5``). value
    ``(B, S, H, D)``, depth ``(B, S, H, Db)``, sampling_locations ``(B, Nq, H, L, P, 3)`` as ``(x, y, d)`` in
    ``[0, 1]``; returns ``(B, Nq, H, D)``.
    """
    wt = _work(value)
    B, _S, H, D = value.shape
    Db = depth.shape[-1]
    _, Nq, _, _L, _P, _ = sampling_locations.shape
    loc, attn = sampling_locations.to(wt), attention_weights.to(wt)
    out = torch.zeros(B, Nq, H, D, dtype=wt)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, 1, H, 1)
    start = 0
    for lvl, (Hl, Wl) in enumerate(spatial_shapes):
        f = value[:, start:start + Hl * Wl].to(wt).reshape(B, Hl, Wl, H, 1, D)
        dp = depth[:, start:start + Hl * Wl].to(wt).reshape(B, Hl, Wl, H, Db, 1)
        vol = (dp * f).permute(0, 1, 2, 4, 3, 5)  # (B, H_l, W_l, Db, H, D): the materialised volume
        start += Hl * Wl
        u = loc[:, :, :, lvl, :, 0] * Wl - 0.5
        w = loc[:, :, :, lvl, :, 1] * Hl - 0.5
        z = loc[:, :, :, lvl, :, 2] * Db - 0.5
        x0, y0, z0 = torch.floor(u), torch.floor(w), torch.floor(z)
        fx, fy, fz = u - x0, w - y0, z - z0
        sample = 0
        for dy in (0, 1):
            for dx in (0, 1):
                for dz in (0, 1):
                    beta = ((fx if dx else 1 - fx) * (fy if dy else 1 - fy) * (fz if dz else 1 - fz))[..., None]
                    sample = sample + beta * _read(vol, b, h, (y0 + dy, x0 + dx, z0 + dz), (Hl, Wl, Db))
        out = out + (sample * attn[:, :, :, lvl, :, None]).sum(3)
    return out.to(value.dtype)


def _lin(lin, x):
    wt = x.dtype
    return x @ lin.weight.to(wt).t() + lin.bias.to(wt)


def _pixel_centres(Y, X, wt):
    pts = [((x + 0.5) / X, (y + 0.5) / Y) for y in range(Y) for x in range(X)]
    return torch.tensor(pts, dtype=wt)  # (Y X, 2), raster order


def naive_deformable_module(module, x):
    """``DeformableAttention2D``'s forward with the naive op: ``x (B, Y, X, C)``."""
    wt = _work(x)
    B, Y, X, C = x.shape
    H, P = module.num_heads, module.num_points
    q = x.to(wt).reshape(B, Y * X, C)
    value = _lin(module.value_proj, q).reshape(B, Y * X, H, C // H)
    off = _lin(module.sampling_offsets, q).reshape(B, Y * X, H, 1, P, 2)
    attn = torch.softmax(_lin(module.attention_weights, q).reshape(B, Y * X, H, P), -1).reshape(B, Y * X, H, 1, P)
    loc = _pixel_centres(Y, X, wt)[None, :, None, None, None, :] + off / torch.tensor([X, Y], dtype=wt)
    out = naive_deformable_attention(value, [(Y, X)], loc, attn).reshape(B, Y * X, C)
    return _lin(module.output_proj, out).reshape(B, Y, X, C).to(x.dtype)


def naive_deformable_3d_module(module, x):
    """``DeformableAttention3D``'s forward with the naive (materialised-volume) op: ``x (B, Y, X, C)``."""
    wt = _work(x)
    B, Y, X, C = x.shape
    H, P, Db = module.num_heads, module.num_points, module.depth_bins
    q = x.to(wt).reshape(B, Y * X, C)
    value = _lin(module.value_proj, q).reshape(B, Y * X, H, C // H)
    depth = torch.softmax(_lin(module.depth_head, q).reshape(B, Y * X, H, Db), -1)
    off = _lin(module.sampling_offsets, q).reshape(B, Y * X, H, 1, P, 3)
    attn = torch.softmax(_lin(module.attention_weights, q).reshape(B, Y * X, H, P), -1).reshape(B, Y * X, H, 1, P)
    ref_d = torch.sigmoid(_lin(module.reference_depth, q))  # (B, N, 1)
    ref = torch.cat([_pixel_centres(Y, X, wt)[None].expand(B, -1, -1), ref_d], -1)[:, :, None, None, None, :]
    loc = ref + off / torch.tensor([X, Y, Db], dtype=wt)
    out = naive_deformable_attention_3d(value, depth, [(Y, X)], loc, attn).reshape(B, Y * X, C)
    return _lin(module.output_proj, out).reshape(B, Y, X, C).to(x.dtype)


def naive_spatial_pyramid_pool(x, levels, mode="max"):
    """SPP (arXiv 1406.4729, Sec. 2.3): for each level ``n`` and bin ``(i, j)``, the max (or mean) of rows
    ``[floor(i H / n), ceil((i + 1) H / n))`` and the same columns; concatenated level, channel, row, column."""
    B, C, H, W = x.shape
    parts = []
    for n in levels:
        cells = torch.zeros(B, C, n, n, dtype=x.dtype)
        for i in range(n):
            r0, r1 = (i * H) // n, -(-((i + 1) * H) // n)
            for j in range(n):
                c0, c1 = (j * W) // n, -(-((j + 1) * W) // n)
                patch = x[:, :, r0:r1, c0:c1].reshape(B, C, -1)
                cells[:, :, i, j] = patch.amax(-1) if mode == "max" else patch.mean(-1)
        parts.append(cells.reshape(B, C * n * n))
    return torch.cat(parts, 1)


def naive_slot_attention_step(q, k, v, scale, eps):
    """Slot attention's read (arXiv 2006.15055, Alg. 1), input by input: ``A[n] = softmax over slots of
    scale <k_n, q_s>`` plus eps, then slot ``s`` = ``sum_n A[n, s] v_n / sum_n A[n, s]``."""
    wt = _work(q)
    q, k, v = q.to(wt), k.to(wt), v.to(wt)
    B, K, _ = q.shape
    N = k.shape[1]
    out = torch.zeros(B, K, v.shape[-1], dtype=wt)
    for b in range(B):
        A = torch.zeros(N, K, dtype=wt)
        for n in range(N):
            A[n] = torch.softmax(scale * (q[b] @ k[b, n]), 0) + eps
        for s in range(K):
            out[b, s] = (A[:, s, None] * v[b]).sum(0) / A[:, s].sum()
    return out


def naive_slot_module(module, x, slots):
    """``SlotAttention``'s forward from explicit slots ``(B, K, C)``, with the naive read and a GRU cell written
    out (PyTorch's gate order r, z, n)."""
    wt = _work(x)
    x, s = x.to(wt), slots.to(wt)
    C = module.dim

    def ln(t, m):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + m.eps) * m.weight.to(wt) + m.bias.to(wt)

    def lin(t, m):
        out = t @ m.weight.to(wt).t()
        return out if m.bias is None else out + m.bias.to(wt)

    xn = ln(x, module.norm_input)
    k, v = lin(xn, module.to_k), lin(xn, module.to_v)
    g = module.gru
    for _ in range(module.iterations):
        q = lin(ln(s, module.norm_slots), module.to_q)
        u = naive_slot_attention_step(q, k, v, C ** -0.5, module.eps)
        gi = u @ g.weight_ih.to(wt).t() + g.bias_ih.to(wt)
        gh = s @ g.weight_hh.to(wt).t() + g.bias_hh.to(wt)
        r = torch.sigmoid(gi[..., :C] + gh[..., :C])
        z = torch.sigmoid(gi[..., C:2 * C] + gh[..., C:2 * C])
        n = torch.tanh(gi[..., 2 * C:] + r * gh[..., 2 * C:])
        s = (1 - z) * n + z * s
        s = s + lin(torch.relu(lin(ln(s, module.norm_mlp), module.mlp[0])), module.mlp[2])
    return s.to(slots.dtype)
