"""Softmax attention by the book: materialise scores, mask, softmax, matmul. The oracle.

Obvious code only: it runs in float64 for float64 inputs and float32 otherwise, and it is
what every fast path is compared against.
"""

from __future__ import annotations

import math

import torch


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale, masked) v`` with fully-masked rows giving zeros.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``; ``Hq % Hkv == 0``.
        allowed: bool broadcastable to ``(B, Hq, Nq, Nk)``, True = attend; None = all.
        scale: defaults to ``D ** -0.5``.
        return_lse: also return ``lse (B, Nq, Hq)`` (``-inf`` for empty rows).

    Returns:
        ``out (B, Nq, Hq, Dv)`` in the dtype of ``q`` (and ``lse`` in float32/float64).
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    qw, kw, vw = q.to(work), k.to(work).repeat_interleave(group, 2), v.to(work).repeat_interleave(group, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", qw, kw) * scale                  # (B, H, Nq, Nk)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    nonempty = denom > 0
    pn = p / torch.where(nonempty, denom, 1.0)                            # (B, H, Nq, Nk)
    if allowed is None:  # every key is allowed: IEEE's sum is already exact
        out = torch.einsum("bhqk,bkhd->bqhd", pn, vw)
    else:
        finite = torch.isfinite(vw)
        out = torch.einsum("bhqk,bkhd->bqhd", pn, torch.where(finite, vw, 0.0))
        if not bool(finite.all()):
            # a masked key has p = 0, but 0 * NaN = NaN: each non-finite value is added, as IEEE's product
            # p * v, to the queries allowed to see it only (the NaN policy of docs/design.md)
            ok = torch.broadcast_to(allowed, pn.shape)                      # (B, H, Nq, Nk)
            for b, kk, h, d in (~finite).nonzero().tolist():
                term = torch.where(ok[b, h, :, kk], pn[b, h, :, kk] * vw[b, kk, h, d], 0.0)  # (Nq,)
                out[b, :, h, d] = out[b, :, h, d] + term
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, denom, 1.0)), float("-inf"))
    return out, lse.squeeze(-1).transpose(1, 2)                          # (B, Nq, H)


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



def causal_dense(nq: int, nk: int, device=None) -> torch.Tensor:
    """Causal mask ``q_idx >= kv_idx`` (top-left aligned, as ``masks.causal()``), ``(nq, nk)``."""
    return torch.arange(nq, device=device)[:, None] >= torch.arange(nk, device=device)[None, :]



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



def naive_gaam(x, offsets, widths, mix_logits=None, axis=1, normalize=False, eps=1e-8, unbiased=False,
               combine="mixture"):
    """GAAM head by head along ``axis`` of ``x (B, N, C)``: population (or unbiased) variance; Gaussians mixed
    by softmax weights or multiplied (``combine="product"``)."""
    h, g = offsets.shape
    chunks = x.chunk(h, dim=-1)
    outs = []
    for i, xi in enumerate(chunks):
        dim = 1 if axis == 1 else 2
        mu = xi.mean(dim, keepdim=True)
        n = xi.shape[dim]
        var = ((xi - mu) ** 2).sum(dim, keepdim=True) / (max(n - 1, 1) if unbiased else n)
        w = torch.softmax(mix_logits[i], -1) if mix_logits is not None else torch.full((g,), 1.0 / g, dtype=x.dtype)
        gate = 1 if combine == "product" else 0
        for j in range(g):
            z = (xi - (mu + offsets[i, j])) / torch.sqrt(var + eps)
            dens = torch.exp(-z ** 2 / (2 * widths[i, j] ** 2))
            gate = gate * dens if combine == "product" else gate + w[j] * dens
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

