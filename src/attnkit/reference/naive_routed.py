"""Naive references of the routed ops (``ops/routed``): block-sparse attention from a layout, MoBA,
BiFormer, PSA (arXiv 2512.04025), VMoBA (arXiv 2506.23858) and HyperAttention (arXiv 2310.05869).

Obvious code only: every score materialised, masks built element by element, Python loops and
sorting where they are clearer. HyperAttention's estimator is kept as unnormalised (numerator,
denominator) pairs with the same randomness as the fast path: per non-causal call ``W = randn(D, r)``
then ``S = randint(0, n_k, (B, H, m))``. Imports only torch."""

from __future__ import annotations

import math

import torch

from attnkit.reference.naive_dense import causal_dense, naive_masked_attention


def layout_to_dense(layout: torch.Tensor, bq: int, bk: int, nq: int, nk: int) -> torch.Tensor:
    """Expand a block layout ``(..., nqb, nkb)`` to an element mask ``(..., nq, nk)``."""
    dense = layout.repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)
    return dense[..., :nq, :nk]



def naive_block_sparse_attention(q, k, v, layout, block_size, extra_dense=None, scale=None):
    """Reference of ``block_gather_attention``: expand the layout, AND the element mask, attend."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    lay = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))
    allowed = layout_to_dense(lay, bq, bk, q.shape[1], k.shape[1])
    if extra_dense is not None:
        allowed = allowed & extra_dense
    return naive_masked_attention(q, k, v, allowed, scale)



def naive_moba_mask(q, k, block, topk, causal=True, routing="token"):
    """MoBA's element mask ``(B, H, N, Nk)`` built query by query from the paper's rule."""
    B, N, H, _D = q.shape
    Nk = k.shape[1]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    n = math.ceil(Nk / block)
    kbar = torch.stack([k[:, j * block:(j + 1) * block].mean(1) for j in range(n)], 1)  # (B, n, H, D)
    allowed = torch.zeros(B, H, N, Nk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for t in range(N):
                qblk = q[b, (t // block) * block:(t // block + 1) * block, h]
                qt = q[b, t, h] if routing == "token" else qblk.mean(0)
                own = t // block if N == Nk else None
                cands = [j for j in range(n) if own is None or (j != own and (j < own or not causal))]
                cands.sort(key=lambda j: (-float(qt @ kbar[b, j, h]), j))
                chosen = ([own] if own is not None else []) + cands[: topk - (own is not None)]
                for j in chosen:
                    allowed[b, h, t, j * block:(j + 1) * block] = True
    if causal:
        allowed &= causal_dense(N, Nk)
    return allowed



def naive_moba(q, k, v, block, topk, causal=True, routing="token"):
    """MoBA reference: explicit mask, one softmax over the selected tokens."""
    return naive_masked_attention(q, k, v, naive_moba_mask(q.detach(), k.detach(), block, topk, causal, routing))[0]



def naive_biformer(q, k, v, n_win, topk, scale=None, route_q=None, route_k=None):
    """BRA reference on the raster grid: region affinities, top-k by loop, element mask, one softmax.

    ``q, k, v (B, Y, X, H, D)``; returns ``(B, Y, X, H, Dv)``. ``route_q/route_k`` (default q, k)
    are what the router sees (tests pass half-rounded copies).
    """
    B, Y, X, H, D = q.shape
    scale = (H * D) ** -0.5 if scale is None else scale
    ry, rx = Y // n_win, X // n_win
    region = (torch.arange(Y)[:, None] // ry * n_win + torch.arange(X)[None, :] // rx).reshape(-1)  # (Y*X,)
    R = n_win * n_win
    rq = q if route_q is None else route_q
    rk = k if route_k is None else route_k
    qf, kf = rq.detach().reshape(B, Y * X, H * D), rk.detach().reshape(B, Y * X, H * D)
    allowed = torch.zeros(B, 1, Y * X, Y * X, dtype=torch.bool)
    for b in range(B):
        qbar = torch.stack([qf[b, region == r].mean(0) for r in range(R)])
        kbar = torch.stack([kf[b, region == r].mean(0) for r in range(R)])
        aff = (qbar * scale) @ kbar.T
        for r in range(R):
            chosen = sorted(range(R), key=lambda j, r=r: (-float(aff[r, j]), j))[:topk]
            for j in chosen:
                allowed[b, 0, region == r] |= (region == j)[None, :]
    out, _ = naive_masked_attention(q.reshape(B, Y * X, H, D), k.reshape(B, Y * X, H, D),
                                    v.reshape(B, Y * X, H, -1), allowed, scale)
    return out.view(B, Y, X, H, -1)



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



def gray_inverse(c: int) -> int:
    """``g^{-1}(c)``: the position of code ``c`` in the reflected Gray sequence."""
    r, shift = c, c >> 1
    while shift:
        r ^= shift
        shift >>= 1
    return r



def _rank(x, w):
    return [gray_inverse(sum(int(float(x[t] @ w[:, i]) > 0) << i for i in range(w.shape[1]))) for t in range(len(x))]



def _parts(q, k, v, hq, hk, block, m, bits, scale, gen):
    """Unnormalised HyperAttention numerator ``(B, H, nq, Dv)`` and denominator ``(B, H, nq)``."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    w = torch.randn(D, bits, generator=gen, dtype=torch.float64)
    S = torch.randint(0, nk, (B, H, m), generator=gen)
    nb = math.ceil(nk / block)
    bq = math.ceil(nq / nb)
    num = torch.zeros(B, H, nq, v.shape[-1], dtype=q.dtype)
    den = torch.zeros(B, H, nq, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            rq, rk = _rank(hq[b, h], w), _rank(hk[b, h], w)
            pos_q = {i: p for p, i in enumerate(sorted(range(nq), key=lambda i: (rq[i], i)))}
            pos_k = {j: p for p, j in enumerate(sorted(range(nk), key=lambda j: (rk[j], j)))}
            for i in range(nq):
                blk = pos_q[i] // bq
                same = torch.tensor([pos_k[j] // block == blk for j in range(nk)])
                a = torch.exp(k[b, h] @ q[b, h, i] * scale)  # (nk,)
                num[b, h, i] = (a * same) @ v[b, h]
                den[b, h, i] = (a * same).sum()
                for s in S[b, h].tolist():
                    if pos_k[s] // block != blk:
                        num[b, h, i] = num[b, h, i] + nk / m * a[s] * v[b, h, s]
                        den[b, h, i] = den[b, h, i] + nk / m * a[s]
    return num, den



def _exact_parts(q, k, v, scale, causal):
    a = torch.exp(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale)
    if causal:
        a = a * torch.ones(q.shape[2], k.shape[2]).tril()
    return a @ v, a.sum(-1)



def _causal(q, k, v, hq, hk, block, m, bits, min_len, scale, gen):
    n = q.shape[2]
    if n <= min_len:
        return _exact_parts(q, k, v, scale, True)
    h = n // 2
    top = _causal(q[:, :, :h], k[:, :, :h], v[:, :, :h], hq[:, :, :h], hk[:, :, :h], block, m, bits, min_len,
                  scale, gen)
    diag = _causal(q[:, :, h:], k[:, :, h:], v[:, :, h:], hq[:, :, h:], hk[:, :, h:], block, m, bits, min_len,
                   scale, gen)
    off = _parts(q[:, :, h:], k[:, :, :h], v[:, :, :h], hq[:, :, h:], hk[:, :, :h], block, m, bits, scale, gen)
    return torch.cat([top[0], diag[0] + off[0]], 2), torch.cat([top[1], diag[1] + off[1]], 2)



def naive_hyper_attention(q, k, v, block_size, sample_size, lsh_bits, min_seq_len, causal=False, scale=None,
                          generator=None, hash_q=None, hash_k=None):
    """HyperAttention ``(B, Nq, H, Dv)`` from the estimator's sums; ``hash_q/k`` (default q/k) feed the LSH."""
    H = q.shape[2]
    rep = H // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh = q.transpose(1, 2)  # (B, H, Nq, D)
    kh, vh = (t.repeat_interleave(rep, 2).transpose(1, 2) for t in (k, v))  # (B, H, Nk, *)
    hq = (q if hash_q is None else hash_q).detach().double().transpose(1, 2)
    hk = (k if hash_k is None else hash_k).detach().double().repeat_interleave(rep, 2).transpose(1, 2)
    if causal:
        num, den = _causal(qh, kh, vh, hq, hk, block_size, sample_size, lsh_bits, min_seq_len, scale, generator)
    elif max(q.shape[1], k.shape[1]) <= min_seq_len:
        num, den = _exact_parts(qh, kh, vh, scale, False)
    else:
        num, den = _parts(qh, kh, vh, hq, hk, block_size, sample_size, lsh_bits, scale, generator)
    return (num / den.unsqueeze(-1)).transpose(1, 2)

