"""Naive references for the routed / sparse / head-level mechanisms (issue 6).

Obvious code only: materialise every score, build masks element by element, loop where
a loop is clearer. These are the specs and the test oracles of ``backends/block_gather.py``
and ``mechanisms/{moba, biformer, s2_attention, moa, hyper_attention, pyramid_sparse, moh,
softplus_attention, gaussian_adaptive, rcmha, single_head}.py``. Imports only torch.
"""

from __future__ import annotations

import math

import torch


def layout_to_dense(layout: torch.Tensor, bq: int, bk: int, nq: int, nk: int) -> torch.Tensor:
    """Expand a block layout ``(..., nqb, nkb)`` to an element mask ``(..., nq, nk)``."""
    dense = layout.repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)
    return dense[..., :nq, :nk]


def naive_masked_attention(q, k, v, allowed=None, scale=None, bias=None):
    """Softmax attention with a bool mask (True = attend); empty rows give zeros and lse ``-inf``.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``.
        allowed: bool broadcastable to ``(B, Hq, Nq, Nk)`` or None.
        scale: default ``D ** -0.5``. bias: additive logits broadcastable to ``(B, Hq, Nq, Nk)``.

    Returns:
        ``(out (B, Nq, Hq, Dv), lse (B, Nq, Hq))``.
    """
    hq, hkv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Nq, Nk)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Nq)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse.permute(0, 2, 1)


def naive_block_sparse_attention(q, k, v, layout, block_size, extra_dense=None, scale=None):
    """Reference of ``block_gather_attention``: expand the layout, AND the element mask, attend."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    lay = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))
    allowed = layout_to_dense(lay, bq, bk, q.shape[1], k.shape[1])
    if extra_dense is not None:
        allowed = allowed & extra_dense
    return naive_masked_attention(q, k, v, allowed, scale)


def causal_dense(nq: int, nk: int, device=None) -> torch.Tensor:
    """Causal mask ``q_idx >= kv_idx`` (top-left aligned, as ``masks.causal()``), ``(nq, nk)``."""
    return torch.arange(nq, device=device)[:, None] >= torch.arange(nk, device=device)[None, :]



# ---- head-level mechanisms ----------------------------------------------------------------


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


def naive_lssa(q, k, v, causal=True, p=None, offset=1.0, short_rows=3, eps=1e-6):
    """LSSA / LSSAR row by row, exactly as the paper's equations read."""
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    out = torch.zeros(B, Nq, H, v.shape[-1], dtype=q.dtype)
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(eps)
    for t in range(Nq):
        vis = torch.tensor([(u <= t) or not causal for u in range(Nk)], dtype=q.dtype)
        n_t = vis.sum()
        lam = math.log(D) * torch.log(n_t)
        a = torch.nn.functional.softplus(lam * torch.einsum("bhd,bkhd->bhk", qn[:, t], kn)) * vis
        a = a / a.sum(-1, keepdim=True)
        if p is not None:
            o_t = offset if n_t > short_rows else 0.0
            r = torch.relu(n_t * a - o_t) * vis
            r = r / r.amax(-1, keepdim=True).clamp_min(1e-300)  # scale-free: avoids N^p overflow
            r = r ** p
            a = r / r.sum(-1, keepdim=True).clamp_min(1e-300)
        out[:, t] = torch.einsum("bhk,bkhd->bhd", a, v)
    return out


def naive_gaam(x, offsets, widths, mix_logits=None, axis=1, normalize=False, eps=1e-8):
    """GAAM head by head with the population variance along ``axis`` of ``x (B, N, C)``."""
    h, g = offsets.shape
    chunks = x.chunk(h, dim=-1)
    outs = []
    for i, xi in enumerate(chunks):
        dim = 1 if axis == 1 else 2
        mu = xi.mean(dim, keepdim=True)
        var = ((xi - mu) ** 2).mean(dim, keepdim=True)
        w = torch.softmax(mix_logits[i], -1) if mix_logits is not None else torch.full((g,), 1.0 / g, dtype=x.dtype)
        gate = 0
        for j in range(g):
            z = (xi - (mu + offsets[i, j])) / torch.sqrt(var + eps)
            gate = gate + w[j] * torch.exp(-z ** 2 / (2 * widths[i, j] ** 2))
        if normalize:
            gate = gate / gate.sum(dim, keepdim=True)
        outs.append(xi * gate)
    return torch.cat(outs, dim=-1)


def naive_relative_attention(q, k, v, u, rel_k, rel_b, causal=True):
    """RCMHA scores ``[(q_t + u)·k_s + q_t·R[t-s] + b[t-s]] / sqrt(D)`` with R gathered per pair."""
    _B, Nq, _H, D = q.shape
    Nk = k.shape[1]
    P = rel_k.shape[0] // 2
    delta = torch.arange(Nq)[:, None] - torch.arange(Nk)[None, :] + P  # (Nq, Nk)
    r = rel_k[delta]  # (Nq, Nk, H, D)
    s = (torch.einsum("bqhd,bkhd->bhqk", q + u, k) + torch.einsum("bqhd,qkhd->bhqk", q, r)
         + rel_b[delta].permute(2, 0, 1)) / math.sqrt(D)
    if causal:
        s = s.masked_fill(~causal_dense(Nq, Nk), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


# ---- routed mechanisms ---------------------------------------------------------------------


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


# ---- static per-head patterns --------------------------------------------------------------


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
