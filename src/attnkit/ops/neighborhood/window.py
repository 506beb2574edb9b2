"""Neighborhood attention by gathering each query's own window: plain tensor ops, traceable, exact with NaN.

Papers: "Neighborhood Attention Transformer" (arXiv 2204.07143) §3.1 (the per-query window form),
"Dilated Neighborhood Attention Transformer" (arXiv 2209.15001) §3. Every query gathers the
``prod(kernel_size)`` keys of its window (an index table built from the NATTEN window bounds) and
runs a softmax over them, so no masked-out key is ever multiplied: a NaN in ``k`` or ``v`` reaches
exactly the queries whose window holds it. Memory O(N K (D + Dv)) per query chunk, so it is the
backend for ``torch.compile`` (the tile plan of ``tiled`` is built with data-dependent Python)
and for inputs holding NaN or infinity, not the fast path.
"""

from __future__ import annotations

import torch

from attnkit.masks.neighborhood import window_bounds

_CHUNK_BYTES = 64 << 20  # gathered keys + values + scores of one query chunk (eager only)


def window_index(shape, kernel_size, dilation, stride, is_causal, device=None):
    """``(idx (N, K), valid (N, K))``: flat key index of each window slot of each query, row-major grid.

    ``K = prod(kernel_size)``; causal windows near the start hold fewer keys: their extra slots are
    invalid (their index is clamped to a real key and must be masked).
    """
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)  # (positions so far, slots so far)
    valid = torch.ones(1, 1, dtype=torch.bool, device=device)
    for n, k, d, s, c in zip(shape, kernel_size, dilation, stride, is_causal):
        g, _u, _L, start, end = window_bounds(torch.arange(n, device=device), n, k, d, s, c)
        t = start[:, None] + torch.arange(k, device=device)  # (n, k) in-group slot positions
        ok = t < end[:, None]
        pos = g[:, None] + d * torch.minimum(t, end[:, None] - 1)  # (n, k) axis key positions
        P, S = idx.shape
        idx = (idx[:, None, :, None] * n + pos[None, :, None, :]).reshape(P * n, S * k)  # (P n, S k)
        valid = (valid[:, None, :, None] & ok[None, :, None, :]).reshape(P * n, S * k)
    return idx, valid


def _attend(q, k, v, idx, valid, scale, partial):
    """q ``(B, C, H, D)`` against the gathered windows ``idx/valid (C, K)`` of k/v ``(B, N, Hkv, D|Dv)``."""
    B, C, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kg = k[:, idx].to(ct)  # (B, C, K, Hkv, D)
    vg = v[:, idx].to(ct)  # (B, C, K, Hkv, Dv)
    if partial:  # causal windows near the start: slots past the window's end
        # invalid slots hold a clamped real key: zero its value so 0 * NaN never happens
        vg = vg.masked_fill(~valid[None, :, :, None, None], 0.0)
    q5 = q.to(ct).view(B, C, Hkv, G, D)  # (B, C, Hkv, G, D): query head h uses kv head h // G
    s = torch.einsum("bchgd,bckhd->bchgk", q5, kg) * scale  # (B, C, Hkv, G, K)
    s = s.masked_fill(~valid[None, :, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, C, Hkv, G); every window holds its query, so finite
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bchgk,bckhe->bchge", p, vg).reshape(B, C, H, -1).to(q.dtype)  # (B, C, H, Dv)
    return out, lse.reshape(B, C, H)


def neighborhood_window(call, chunked: bool = True):
    """Run a ``NACall`` by per-query windows; returns ``out (B, *S, H, Dv)`` (and the lse when asked)."""
    q, k, v = call.q, call.k, call.v
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    n = call.n
    qf = q.reshape(B, n, H, D)  # (B, N, H, D)
    kf = k.reshape(B, n, Hkv, D)  # (B, N, Hkv, D)
    vf = v.reshape(B, n, Hkv, Dv)  # (B, N, Hkv, Dv)
    idx, valid = window_index(call.spatial, call.kernel_size, call.dilation, call.stride, call.is_causal,
                              q.device)
    K = idx.shape[1]
    per_query = B * K * (Hkv * (D + Dv) + H) * 4
    step = max(1, _CHUNK_BYTES // per_query) if chunked else n
    outs, lses = [], []
    for lo in range(0, n, step):
        o, lse = _attend(qf[:, lo:lo + step], kf, vf, idx[lo:lo + step], valid[lo:lo + step], call.scale,
                         any(call.is_causal))
        outs.append(o)
        lses.append(lse)
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, 1)).reshape(B, *call.spatial, H, Dv)  # (B, *S, H, Dv)
    if call.return_lse:
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, 1)
        return out, lse.reshape(B, *call.spatial, H)  # (B, *S, H), float32 (float64 for float64)
    return out
