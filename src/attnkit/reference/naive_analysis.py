"""Naive twins of ``attnkit.analysis``: loops and dense matrices written from the equations, torch only.

Rollout and flow follow arXiv 2005.00928 §3; the head metrics arXiv 2303.13731; WAAD/FAI arXiv 2510.13554;
VAR arXiv 2503.03321 §4. Slow on purpose: they are the oracle for small inputs.
"""

from __future__ import annotations

import math

import torch


def naive_attention_probs(q, k, allowed=None, scale=None):
    """``softmax(q k^T * scale)`` per head with masked entries excluded: heads-last ``q (B, Nq, H, D)``,
    ``k (B, Nk, Hkv, D)`` -> ``(B, H, Nq, Nk)`` float64; empty rows are 0."""
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, h, nq, nk, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            for i in range(nq):
                s = [float(q[bi, i, hi].double() @ k[bi, j, kh].double()) * scale for j in range(nk)]
                ok = [True] * nk if allowed is None else [bool(allowed[i, j]) for j in range(nk)]
                mx = max([s[j] for j in range(nk) if ok[j]], default=None)
                if mx is None:
                    continue
                e = [math.exp(s[j] - mx) if ok[j] else 0.0 for j in range(nk)]
                z = sum(e)
                for j in range(nk):
                    out[bi, hi, i, j] = e[j] / z
    return out


def _residual_mean(a, add_residual=True):
    m = a.double().mean(1)                                                # (B, N, N) head mean
    if add_residual:
        m = 0.5 * m + 0.5 * torch.eye(m.shape[-1], dtype=torch.float64)
    return m


def naive_rollout(maps, add_residual=True):
    """``R = Ã_L ... Ã_1`` with ``Ã = 0.5 mean_h A + 0.5 I``, multiplied one entry at a time."""
    mats = [_residual_mean(a, add_residual) for a in maps]
    b, n, _ = mats[0].shape
    r = mats[0].clone()
    for m in mats[1:]:
        new = torch.zeros_like(r)
        for bi in range(b):
            for i in range(n):
                for j in range(n):
                    new[bi, i, j] = sum(m[bi, i, t] * r[bi, t, j] for t in range(n))
        r = new
    return r


def naive_max_flow(cap, s, t):
    """Ford-Fulkerson with depth-first augmenting paths on a dense capacity matrix (list of lists)."""
    n = len(cap)
    res = [row[:] for row in cap]
    total = 0.0

    def dfs(u, f, seen):
        if u == t:
            return f
        seen.add(u)
        for v in range(n):
            if v not in seen and res[u][v] > 1e-12:
                got = dfs(v, min(f, res[u][v]), seen)
                if got > 0:
                    res[u][v] -= got
                    res[v][u] += got
                    return got
        return 0.0

    while True:
        f = dfs(s, float("inf"), set())
        if f <= 0:
            return total
        total += f


def naive_flow(maps, add_residual=True):
    """Attention flow: for each (output i, input j) a max-flow on the dense layered graph."""
    mats = [_residual_mean(a, add_residual) for a in maps]
    b, n, _ = mats[0].shape
    size = (len(mats) + 1) * n
    out = torch.zeros(b, n, n, dtype=torch.float64)
    for bi in range(b):
        cap = [[0.0] * size for _ in range(size)]
        for layer, m in enumerate(mats, start=1):
            for i in range(n):
                for j in range(n):
                    cap[(layer - 1) * n + j][layer * n + i] = float(m[bi, i, j])
        for i in range(n):
            for j in range(n):
                out[bi, i, j] = naive_max_flow(cap, j, len(mats) * n + i)
    return out


def naive_entropy(a):
    """``-Σ_j a_ij log a_ij`` per row, with ``0 log 0 = 0``: ``(B, H, Nq, Nk) -> (B, H, Nq)``."""
    b, h, nq, _ = a.shape
    out = torch.zeros(b, h, nq, dtype=torch.float64)
    for idx in range(b * h * nq):
        bi, hi, i = idx // (h * nq), (idx // nq) % h, idx % nq
        out[bi, hi, i] = -sum(float(p) * math.log(float(p)) for p in a[bi, hi, i] if p > 0)
    return out


def naive_mean_attention_distance(a, grid, patch_size=1.0, num_prefix=0):
    """``mean_i Σ_j a_ij ‖p_i − p_j‖ · patch_size`` over patch tokens: ``-> (B, H)``."""
    gh, gw = grid
    b, h = a.shape[:2]
    out = torch.zeros(b, h, dtype=torch.float64)
    g = gh * gw
    for bi in range(b):
        for hi in range(h):
            tot = 0.0
            for i in range(g):
                for j in range(g):
                    dr, dc = i // gw - j // gw, i % gw - j % gw
                    tot += float(a[bi, hi, num_prefix + i, num_prefix + j]) * math.hypot(dr, dc)
            out[bi, hi] = tot / g * patch_size
    return out


def naive_attention_strength(a, grid, num_prefix=0):
    """Profile ``(H, 2Gh − 1, 2Gw − 1)``: mean over batch and valid queries of the attention at each offset."""
    gh, gw = grid
    b, h = a.shape[:2]
    prof = torch.zeros(h, 2 * gh - 1, 2 * gw - 1, dtype=torch.float64)
    for hi in range(h):
        for dr in range(-(gh - 1), gh):
            for dc in range(-(gw - 1), gw):
                vals = []
                for bi in range(b):
                    for r in range(gh):
                        for c in range(gw):
                            r2, c2 = r + dr, c + dc
                            if 0 <= r2 < gh and 0 <= c2 < gw:
                                vals.append(float(a[bi, hi, num_prefix + r * gw + c, num_prefix + r2 * gw + c2]))
                prof[hi, dr + gh - 1, dc + gw - 1] = sum(vals) / len(vals)
    return prof


def naive_waad(a, window=10):
    """``Σ_{s ≤ t} A[t, s] min(t − s, W)``: ``(B, H, N, N) -> (B, H, N)``."""
    b, h, n, _ = a.shape
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for t in range(n):
                out[bi, hi, t] = sum(float(a[bi, hi, t, s]) * min(t - s, window) for s in range(t + 1))
    return out


def naive_fai(a):
    """``mean_{t > s} A[t, s]``; NaN for the last token: ``-> (B, H, N)``."""
    b, h, n, _ = a.shape
    out = torch.full((b, h, n), float("nan"), dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for s in range(n - 1):
                out[bi, hi, s] = sum(float(a[bi, hi, t, s]) for t in range(s + 1, n)) / (n - s - 1)
    return out


def naive_var(a, sink, image, p=0.6, rho=0.5, min_image_share=0.2):
    """VAR row by row: ``sink``, ``image`` bool ``(Nk,)``."""
    out = a.double().clone()
    b, h, nq, nk = a.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                row = [float(x) for x in a[bi, hi, i]]
                img = sum(row[j] for j in range(nk) if image[j])
                img_sink = sum(row[j] for j in range(nk) if image[j] and sink[j])
                targets = [j for j in range(nk) if image[j] and not sink[j]]
                tw = sum(row[j] for j in targets)
                if img < min_image_share or img_sink / (img + 1e-6) > rho or tw <= 0:
                    continue
                budget = (1 - p) * sum(row[j] for j in range(nk) if sink[j])
                for j in range(nk):
                    if sink[j]:
                        out[bi, hi, i, j] = p * row[j]
                for j in targets:
                    out[bi, hi, i, j] = row[j] + budget * row[j] / tw
    return out
