"""Naive reference of PSA (Pyramid Sparse Attention, arXiv 2512.04025).

Obvious code: build every pooled key of every level, one element mask and one ``ln r`` bias
over the concatenated key axis, then a single masked softmax. Levels are assigned row by
row with Python sorting. Oracle of ``mechanisms/pyramid_sparse.py``.
"""

from __future__ import annotations

import math

import torch

from attnkit.reference.naive_sparse import naive_masked_attention


def naive_psa_importance(q, k, block_q, block_kv, causal=False, offsets_q=None, offsets_k=None, scale=None):
    """Importance ``S (B, H, nqb, nkb)``: max softmax probability of sampled queries over sampled keys per tile."""
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    scale = D ** -0.5 if scale is None else scale
    nqb, nkb = math.ceil(Nq / block_q), Nk // block_kv
    oq = list(range(0, block_q, 4))[: max(1, block_q // 4)] if offsets_q is None else offsets_q
    ok = list(range(0, block_kv, 4))[: max(1, block_kv // 4)] if offsets_k is None else offsets_k
    qpos = [min(i * block_q + o, Nq - 1) for i in range(nqb) for o in oq]
    kpos = [j * block_kv + o for j in range(nkb) for o in ok]
    S = torch.zeros(B, H, nqb, nkb, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for a, t in enumerate(qpos):
                logits = torch.stack([q[b, t, h] @ k[b, u, h] * scale for u in kpos])
                if causal:
                    logits = logits.masked_fill(torch.tensor(kpos) > t, float("-inf"))
                p = torch.softmax(logits, 0)
                for c, _u in enumerate(kpos):
                    i, j = a // len(oq), c // len(ok)
                    S[b, h, i, j] = max(S[b, h, i, j], p[c])
    return S


def naive_psa_levels(S, ratios, causal=False, block_q=1, block_kv=1):
    """Pool factors per tile: rank KV blocks per row, give band ``l`` factor ``2**l``, the rest 0."""
    *lead, nqb, nkb = S.shape
    flat = S.reshape(-1, nqb, nkb)
    M = torch.zeros(flat.shape, dtype=torch.long)
    for g in range(flat.shape[0]):
        for i in range(nqb):
            cands, forced = list(range(nkb)), []
            if causal:
                last = min((i + 1) * block_q - 1, nkb * block_kv - 1)
                cands = [j for j in range(nkb) if j * block_kv <= last]
                forced = [j for j in cands if (j + 1) * block_kv > i * block_q]  # touches the diagonal
            rest = sorted((j for j in cands if j not in forced), key=lambda j: (-float(flat[g, i, j]), j))
            ranked = forced + rest
            n, acc, prev = len(ranked), 0.0, 0
            for lvl, x in enumerate(ratios):
                acc += x
                e = math.floor(n * acc + 0.5)
                if lvl == 0:
                    e = max(e, len(forced), min(n, 1))
                e = min(n, max(prev, e))
                for j in ranked[prev:e]:
                    M[g, i, j] = 2 ** lvl
                prev = e
    return M.view(*lead, nqb, nkb)


def naive_pyramid_attention(q, k, v, level_map, block_q, block_kv, causal=False, scale=None, use_log_bias=True):
    """One softmax over the pooled keys of every level (``+ln r`` each); ``level_map (B|1, H|1, nqb, nkb)``."""
    B, Nq, H, _D = q.shape
    Nk = k.shape[1]
    M = level_map.reshape((1,) * (4 - level_map.dim()) + tuple(level_map.shape)).expand(B, H, -1, -1)
    keys, vals, masks, biases = [], [], [], []
    r = 1
    while r <= block_kv:
        kr = torch.stack([k[:, p * r:(p + 1) * r].mean(1) for p in range(Nk // r)], 1)  # (B, Nk/r, Hkv, D)
        vr = torch.stack([v[:, p * r:(p + 1) * r].mean(1) for p in range(Nk // r)], 1)
        allowed = torch.zeros(B, H, Nq, Nk // r, dtype=torch.bool)
        for t in range(Nq):
            for p in range(Nk // r):
                vis = (not causal) or (p + 1) * r - 1 <= t
                allowed[:, :, t, p] = (M[:, :, t // block_q, p * r // block_kv] == r) & vis
        keys.append(kr)
        vals.append(vr)
        masks.append(allowed)
        biases.append(torch.full((Nk // r,), math.log(r) if use_log_bias else 0.0, dtype=q.dtype))
        r *= 2
    out, _ = naive_masked_attention(q, torch.cat(keys, 1), torch.cat(vals, 1), torch.cat(masks, -1), scale,
                                    torch.cat(biases))
    return out
