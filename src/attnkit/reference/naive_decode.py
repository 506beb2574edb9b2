"""Decode-time attention by the book: the oracles of ``attnkit.ops.decode``.

Obvious code only (torch and the other reference modules): a dense boolean mask built from
positions, materialised scores, quantize-then-dequantize caches, top-k by sorting.

Covers split-KV decoding (Lean Attention, arXiv 2405.10480; the split/merge itself has no naive
twin: its oracle is plain attention), StreamingLLM sinks (arXiv 2309.17453 §3.2), KIVI
(arXiv 2402.02750 §3) and ZipCache (arXiv 2405.14256 §4) quantizers, and TidalDecode's
position-persistent sparse attention (arXiv 2410.05076 §3).
"""

from __future__ import annotations

import torch

from attnkit.reference.naive_dense import naive_attention


def decode_allowed(nq: int, nk: int, offset: int | None = None, window: int | None = None,
                   sinks: int = 0) -> torch.Tensor:
    """Bool ``(Nq, Nk)``: query ``i`` sits at position ``offset + i`` (default ``Nk - Nq``) and sees key ``j`` iff
    ``j <= offset + i`` and (no window, or ``j > offset + i - window``, or ``j < sinks``)."""
    offset = nk - nq if offset is None else offset
    pos = torch.arange(nq)[:, None] + offset
    j = torch.arange(nk)[None, :]
    ok = j <= pos
    if window is not None:
        ok = ok & ((j > pos - window) | (j < sinks))
    return ok


def naive_decode_attention(q, k, v, *, offset=None, window=None, sinks=0, scale=None, return_lse=False):
    """Softmax attention of ``q (B, Nq, Hq, D)`` over a cache ``k (B, Nk, Hkv, D)``, ``v (B, Nk, Hkv, Dv)``
    under :func:`decode_allowed`; returns ``out (B, Nq, Hq, Dv)`` (and ``lse (B, Nq, Hq)``)."""
    allowed = decode_allowed(q.shape[1], k.shape[1], offset, window, sinks)
    return naive_attention(q, k, v, allowed, scale=scale, return_lse=return_lse)


# ---- quantizers: quantize then dequantize, element by element ------------------------------------------

def naive_fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest along ``dim``: ``round((x - min) / step) * step + min``,
    ``step = (max - min) / (2**bits - 1)`` (a constant slice is returned exactly)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    step = (hi - lo) / (2 ** bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.where(step > 0, torch.round((x - lo) / safe) * safe + lo, x)


def naive_kivi_dequant(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, residual: int):
    """KIVI's cache as attention sees it: ``k, v (B, N, H, D)``.

    The first ``(N // residual) * residual`` tokens are quantized, the rest (fewer than ``residual``)
    stay in full precision (KIVI's residual window). Keys: per channel over groups of ``group``
    tokens. Values: per token over groups of ``min(group, Dv)`` channels.
    """
    n = k.shape[1]
    nq = (n // residual) * residual
    kq, vq = k.clone(), v.clone()
    for t0 in range(0, nq, group):
        kq[:, t0:t0 + group] = naive_fake_quant(k[:, t0:t0 + group], bits, dim=1)      # per channel over tokens
    cg = min(group, v.shape[-1])
    for c0 in range(0, v.shape[-1], cg):
        vq[:, :nq, :, c0:c0 + cg] = naive_fake_quant(v[:, :nq, :, c0:c0 + cg], bits, dim=-1)  # per token
    return kq, vq


def naive_zipcache_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """ZipCache's channel-separable tokenwise quantizer of ``x (B, N, H, D)``: channels normalised by
    ``c = sqrt(max |x|)`` over (B, N), then min/max per token over all ``H * D`` channels."""
    b, n, h, d = x.shape
    flat = x.reshape(b, n, h * d)                                        # (B, N, C)
    c = flat.abs().amax(dim=(0, 1)).sqrt()                               # (C,)
    c = torch.where(c > 0, c, torch.ones_like(c))
    return (naive_fake_quant(flat / c, bits, dim=-1) * c).reshape(b, n, h, d)


def naive_normalized_saliency(probs: torch.Tensor) -> torch.Tensor:
    """``probs (B, Hq, Nq, Nk)`` with query ``i`` at position ``Nk - Nq + i``: ZipCache's saliency
    ``p_j = sum_i A[i, j] / (number of queries that can see j)``, summed over heads: ``(B, Nk)``."""
    nq, nk = probs.shape[-2:]
    visible = decode_allowed(nq, nk).sum(0).clamp_min(1)               # (Nk,)
    return probs.sum(dim=(1, 2)) / visible


# ---- TidalDecode -------------------------------------------------------------------------------------

def naive_topk_positions(q, k, budget: int, *, scale=None):
    """Per query head, the ``budget`` positions of highest ``q . k``: ``q (B, 1, Hq, D)``, ``k (B, N, Hkv, D)``
    -> long ``(B, Hq, budget)`` sorted ascending (ties broken by the lower position)."""
    group = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhd,bkhd->bhk", q[:, 0], k.repeat_interleave(group, 2)) * scale   # (B, Hq, N)
    budget = min(budget, k.shape[1])
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :budget]
    return idx.sort(-1).values


def naive_sparse_decode(q, k, v, positions, *, scale=None):
    """Attention of ``q (B, 1, Hq, D)`` over only ``positions (B, Hq, k)`` of the cache, per head."""
    b, _, hq, d = q.shape
    group = hq // k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, 1, hq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            idx = positions[bi, h]
            ks, vs = k[bi, idx, h // group], v[bi, idx, h // group]      # (k, D), (k, Dv)
            p = torch.softmax((ks @ q[bi, 0, h]) * scale, dim=0)
            out[bi, 0, h] = p @ vs
    return out


def naive_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (half-split layout, as Llama in transformers) of ``x (B, N, H, D)`` at ``positions (N,)``."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None]                        # (N, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[None, :, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def naive_streaming_attention(q, k, v, sinks: int, window: int, *, base: float = 10000.0, scale=None):
    """StreamingLLM over un-rotated ``k (B, N, H, D)`` and a query ``q (B, 1, Hq, D)`` that is the last token:
    keep the first ``sinks`` and the last ``window`` tokens, then rotate with positions *inside the kept cache*
    (``0..len-1``, the query at the last one), as arXiv 2309.17453 §3.2 prescribes."""
    n = k.shape[1]
    keep = list(range(min(sinks, n))) + [j for j in range(max(sinks, n - window), n)]
    keep = torch.tensor(sorted(set(keep)))
    pos = torch.arange(keep.numel())
    kr = naive_rope(k[:, keep], pos, base)
    qr = naive_rope(q, pos[-1:], base)
    return naive_attention(qr, kr, v[:, keep], scale=scale)


def bits_error_bound(bits: int) -> float:
    """Worst-case relative rounding error of one element: half a step of a ``2**bits - 1`` step grid."""
    return 0.5 / (2 ** bits - 1)


__all__ = [
    "bits_error_bound", "decode_allowed", "naive_decode_attention", "naive_fake_quant", "naive_kivi_dequant",
    "naive_normalized_saliency", "naive_rope", "naive_sparse_decode", "naive_streaming_attention",
    "naive_topk_positions", "naive_zipcache_fake_quant",
]
