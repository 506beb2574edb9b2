"""Naive reference of VMoBA (arXiv 2506.23858): the spec and test oracle of ``mechanisms/vmoba.py``.

Obvious code: block ids token by token from the partition rule, block means by boolean
masks, the pool of (query, block) similarities per head sorted in Python, the element mask
built pair by pair, one masked softmax over the original (raster) token order.
"""

from __future__ import annotations

import torch

from attnkit.reference.naive_sparse import naive_masked_attention


def naive_block_ids(grid_shape, mode, block_1d=2, block_2d=(8, 8), block_3d=(2, 8, 8)) -> torch.Tensor:
    """Block id of each raster token ``(t, y, x)`` under the 1-D / 2-D / 3-D partition -> ``(N,)``."""
    T, Y, X = grid_shape
    ids = []
    for t in range(T):
        for y in range(Y):
            for x in range(X):
                if mode == "1d":  # block_1d whole frames
                    ids.append(t // block_1d)
                elif mode == "2d":  # an (s_Y, s_X) tile through all frames
                    ids.append((y // block_2d[0]) * (X // block_2d[1]) + x // block_2d[1])
                else:  # an (s_T, s_Y, s_X) cube
                    st, sy, sx = block_3d
                    ids.append(((t // st) * (Y // sy) + y // sy) * (X // sx) + x // sx)
    return torch.tensor(ids)


def naive_vmoba_selection(q, k, ids, selection="threshold", threshold=0.25, topk=None) -> torch.Tensor:
    """Selected ``(query, block)`` pairs ``(B, H, N, n)`` bool, one pool per batch and head.

    q: ``(B, N, H, D)``; k: ``(B, N, Hkv, D)``; ``ids (N,)`` raster block ids.
    """
    B, N, H, _D = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    n = int(ids.max()) + 1
    kbar = torch.stack([k[:, ids == j].mean(1) for j in range(n)], 1)  # (B, n, H, D)
    sel = torch.zeros(B, H, N, n, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            s = [[float(q[b, t, h] @ kbar[b, j, h]) for j in range(n)] for t in range(N)]
            for t in range(N):
                sel[b, h, t, int(ids[t])] = True  # the own block, always
            others = [(t, j) for t in range(N) for j in range(n) if j != int(ids[t])]
            if selection == "local":
                for t in range(N):
                    cand = sorted((j for j in range(n) if j != int(ids[t])), key=lambda j, t=t: (-s[t][j], j))
                    for j in cand[: int(topk) - 1]:
                        sel[b, h, t, j] = True
                continue
            if selection == "topk":
                others.sort(key=lambda p: (-s[p[0]][p[1]], p[0], p[1]))
                for t, j in others[: round(topk * N) - N]:
                    sel[b, h, t, j] = True
                continue
            if threshold >= 1.0:
                sel[b, h] = True
                continue
            lo = min(min(r) for r in s)
            hi = max(max(r) for r in s)
            mass = [[(x - lo) / (hi - lo) if hi > lo else 1.0 for x in r] for r in s]
            total = sum(sum(r) for r in mass)
            acc = sum(mass[t][int(ids[t])] for t in range(N))  # own pairs count first
            others.sort(key=lambda p: (-mass[p[0]][p[1]], p[0], p[1]))
            for t, j in others:
                if acc >= threshold * total:
                    break
                sel[b, h, t, j] = True
                acc += mass[t][j]
    return sel


def naive_vmoba(q, k, v, ids, selection="threshold", threshold=0.25, topk=None, route_q=None, route_k=None,
                scale=None):
    """VMoBA reference: select pairs, expand to tokens, one softmax per query.

    ``route_q / route_k`` (default ``q, k``) are what the router sees (tests pass half-rounded copies).
    Returns ``(B, N, H, Dv)``.
    """
    rq = (q if route_q is None else route_q).detach()
    rk = (k if route_k is None else route_k).detach()
    sel = naive_vmoba_selection(rq, rk, ids, selection, threshold, topk)  # (B, H, N, n)
    allowed = sel[..., ids]  # (B, H, N, N): query t sees token u iff it selected u's block
    return naive_masked_attention(q, k, v, allowed, scale)[0]


def dense_flat(q, k, v, scale=None):
    """Plain non-causal attention over the flattened tokens ``(B, N, H, D)``."""
    return naive_masked_attention(q, k, v, None, scale)[0]

