"""Naive references for the routed / sparse / head-level mechanisms (issue 6).

Obvious code only: materialise every score, build masks element by element, loop where
a loop is clearer. These are the specs and the test oracles of ``backends/block_gather.py``
and ``mechanisms/{moba, biformer, s2_attention, moa, hyper_attention, pyramid_sparse, moh,
softplus_attention, gaussian_adaptive, rcmha, single_head}.py``. Imports only torch.
"""

from __future__ import annotations

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

