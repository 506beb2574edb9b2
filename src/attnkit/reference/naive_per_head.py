"""Naive references of the per-head ops (``ops/per_head``): MoH's head gates, S2-Attention's per-head
strided layouts and MoA's per-head spans, built element by element. Imports only torch."""

from __future__ import annotations

import torch


def naive_moh_gates(x, w_h, w_s, w_r, topk):
    """MoH gates token by token (released-code rescaling) and ``L_b = sum_j f_j P_j``."""
    B, N, _ = x.shape
    gates, sel_count, p_sum = [], 0, 0
    for b in range(B):
        for t in range(N):
            xt = x[b, t]
            row = []
            both = w_s is not None and w_r is not None
            a = torch.softmax(xt @ w_h, -1) * 2 if both else torch.ones(2, dtype=x.dtype)
            if w_s is not None:
                row.append(a[0] * torch.softmax(xt @ w_s, -1) * w_s.shape[1])
            if w_r is not None:
                p = torch.softmax(xt @ w_r, -1)
                chosen = torch.zeros_like(p)
                for j in torch.argsort(p, descending=True, stable=True)[:topk]:
                    chosen[j] = 1.0
                row.append(a[1] * p * chosen / (p * chosen).sum() * topk)
                sel_count = sel_count + chosen
                p_sum = p_sum + p
            gates.append(torch.cat(row))
    loss = (sel_count / (B * N) * p_sum / (B * N)).sum() if w_r is not None else torch.zeros((), dtype=x.dtype)
    return torch.stack(gates).view(B, N, -1), loss



def naive_s2_mask(H, N, block, local, vert, causal=True):
    """S2-Attention element mask ``(1, H, N, N)`` pair by pair from dkernel's rule."""
    sigma = max(1, vert // H)
    m = torch.zeros(1, H, N, N, dtype=torch.bool)
    for h in range(H):
        for t in range(N):
            for u in range(N):
                i, j = t // block, u // block
                if causal:
                    ok = u <= t and (i - j < local or (j + h * sigma) % vert == 0)
                else:
                    left, right = max(0, i - j - local + 1), max(0, j - i - local + 1)
                    ok = (left + right) % vert == 0
                m[0, h, t, u] = ok
    return m



def naive_moa_mask(spans, sink, N):
    """MoA element mask ``(1, H, N, N)``: ``u <= t and (t - u < S_h or u < g)``."""
    H = len(spans)
    m = torch.zeros(1, H, N, N, dtype=torch.bool)
    for h in range(H):
        for t in range(N):
            for u in range(t + 1):
                m[0, h, t, u] = (t - u < int(spans[h])) or (u < sink)
    return m

