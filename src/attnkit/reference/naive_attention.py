"""Softmax attention by the book: materialise scores, mask, softmax, matmul. The oracle.

Obvious code only: it runs in float64 for float64 inputs and float32 otherwise, and it is
what every fast path is compared against.
"""

from __future__ import annotations

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
    out = torch.einsum("bhqk,bkhd->bqhd", p / torch.where(nonempty, denom, 1.0), vw).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, denom, 1.0)), float("-inf"))
    return out, lse.squeeze(-1).transpose(1, 2)                          # (B, Nq, H)
