"""Naive references of the local ops (``ops/local``): HaloNet's haloed blocks, MaxViT's block and grid
axes and CCNet's criss-cross paths, one query pixel at a time over the keys the paper lists.

Obvious code only: float64 for float64 inputs, float32 otherwise; imports only torch.
"""

from __future__ import annotations

import torch


def _work(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def naive_halo_attention(q, k, v, block_size, halo_size, rel_h=None, rel_w=None, mask_padding=True, scale=None):
    """HaloNet: pixel ``(y, x)`` of block ``(y // b, x // b)`` attends the ``(b + 2h)^2`` window around its
    block; logit ``scale q.k + q.rel_h[ky - y + b + h - 1] + q.rel_w[kx - x + b + h - 1]``. Window positions
    outside the image are skipped (``mask_padding``) or zero keys/values.

    q, k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``; returns ``(B, Y, X, H, Dv)``.
    """
    B, Y, X, H, D = q.shape
    b, h = block_size, halo_size
    W = b + 2 * h
    scale = D ** -0.5 if scale is None else scale
    wt = _work(q)
    qw, kw, vw = q.to(wt), k.to(wt), v.to(wt)
    out = torch.zeros(B, Y, X, H, v.shape[-1], dtype=wt)
    for y in range(Y):
        for x in range(X):
            y0, x0 = (y // b) * b - h, (x // b) * b - h
            logits, vals = [], []
            for ky in range(y0, y0 + W):
                for kx in range(x0, x0 + W):
                    inside = 0 <= ky < Y and 0 <= kx < X
                    if not inside and mask_padding:
                        continue
                    kk = kw[:, ky, kx] if inside else torch.zeros_like(kw[:, 0, 0])  # (B, H, D)
                    vals.append(vw[:, ky, kx] if inside else torch.zeros_like(vw[:, 0, 0]))
                    s = (qw[:, y, x] * kk).sum(-1) * scale  # (B, H)
                    if rel_h is not None:
                        qq = qw[:, y, x]  # (B, H, D)
                        s = s + qq @ rel_h[ky - y + b + h - 1].to(wt) + qq @ rel_w[kx - x + b + h - 1].to(wt)
                    logits.append(s)
            p = torch.softmax(torch.stack(logits, -1), -1)  # (B, H, n)
            out[:, y, x] = torch.einsum("bhn,nbhd->bhd", p, torch.stack(vals))
    return out.to(q.dtype)


def _grouped_attention(q, k, v, group, slot, bias, scale):
    """Every pixel attends the pixels of its own ``group`` (``(Y, X)`` ids); ``bias[h, slot_q, slot_k]``."""
    B, Y, X, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    wt = _work(q)
    qf, kf, vf = q.to(wt).reshape(B, Y * X, H, D), k.to(wt).reshape(B, Y * X, H, D), v.to(wt).reshape(B, Y * X, H, -1)
    group, slot = group.reshape(-1), slot.reshape(-1)
    out = torch.zeros(B, Y * X, H, v.shape[-1], dtype=wt)
    for t in range(Y * X):
        keys = (group == group[t]).nonzero().flatten()
        s = torch.einsum("bhd,bnhd->bhn", qf[:, t], kf[:, keys]) * scale  # (B, H, n)
        if bias is not None:
            s = s + bias[:, slot[t], slot[keys]].to(wt)  # (H, n)
        out[:, t] = torch.einsum("bhn,bnhd->bhd", torch.softmax(s, -1), vf[:, keys])
    return out.reshape(B, Y, X, H, -1).to(q.dtype)


def naive_block_attention(q, k, v, block_size, bias=None, scale=None):
    """MaxViT block attention: pixel ``(y, x)`` attends its ``P x P`` window ``(y // P, x // P)``; slot
    ``(y mod P) P + x mod P`` indexes ``bias (H, P*P, P*P)``. q, k, v ``(B, Y, X, H, D)``."""
    Y, X = q.shape[1:3]
    P = block_size
    yy, xx = torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij")
    return _grouped_attention(q, k, v, (yy // P) * X + xx // P, (yy % P) * P + xx % P, bias, scale)


def naive_grid_attention(q, k, v, grid_size, bias=None, scale=None):
    """MaxViT grid attention: pixel ``(y, x)`` attends the ``G x G`` pixels sharing ``(y mod Y/G, x mod X/G)``;
    slot ``(y div Y/G) G + x div X/G`` indexes ``bias (H, G*G, G*G)``. q, k, v ``(B, Y, X, H, D)``."""
    Y, X = q.shape[1:3]
    G = grid_size
    sy, sx = Y // G, X // G
    yy, xx = torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij")
    return _grouped_attention(q, k, v, (yy % sy) * X + xx % sx, (yy // sy) * G + xx // sx, bias, scale)


def naive_criss_cross_attention(q, k, v, scale=1.0):
    """CCNet: pixel ``(y, x)`` attends its row ``y`` and its column ``x``, the centre once, one joint
    softmax of ``scale q.k``. q, k ``(B, Y, X, H, D)``, v ``(B, Y, X, H, Dv)``; returns ``(B, Y, X, H, Dv)``."""
    B, Y, X, H, _ = q.shape
    wt = _work(q)
    qw, kw, vw = q.to(wt), k.to(wt), v.to(wt)
    out = torch.zeros(B, Y, X, H, v.shape[-1], dtype=wt)
    for y in range(Y):
        for x in range(X):
            keys = [(y, z) for z in range(X)] + [(z, x) for z in range(Y) if z != y]
            kk = torch.stack([kw[:, a, c] for a, c in keys])  # (n, B, H, D)
            vv = torch.stack([vw[:, a, c] for a, c in keys])
            p = torch.softmax(torch.einsum("bhd,nbhd->bhn", qw[:, y, x], kk) * scale, -1)
            out[:, y, x] = torch.einsum("bhn,nbhd->bhd", p, vv)
    return out.to(q.dtype)
