"""Reference neighborhood attention: obvious loops build the mask, then dense masked softmax attention.

Papers: "Faster Neighborhood Attention" (arXiv 2403.04690), "Generalized Neighborhood
Attention" (arXiv 2504.16922); index rules of NATTEN (arXiv 2204.07143 §3.1, 2209.15001 §3), written here
as plain Python loops on purpose (it is the oracle; the fast path uses a separate tensor
formulation). Imports only torch.
"""

from __future__ import annotations

import itertools
import math

import torch


def naive_axis_neighbors(n: int, k: int, d: int = 1, s: int = 1, causal: bool = False) -> list[list[int]]:
    """For each position ``i`` of one axis, the sorted list of key positions it may attend to."""
    out = []
    for i in range(n):
        g, u = i % d, i // d
        L = len(range(g, n, d))  # tokens in dilation group g
        if causal:
            lead = min((u // s) * s + s - 1, L - 1)  # last member of the stride group
            start = max(lead - (k - 1), 0)
            end = u + 1
        else:
            lead = min((u // s) * s + s // 2, L - 1)  # centre member (right one if s is even)
            start = min(max(lead - k // 2, 0), L - k)  # shift the window inside [0, L)
            end = start + k
        out.append([g + d * t for t in range(start, end)])
    return out


def naive_neighborhood_mask(shape: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...],
                            stride: tuple[int, ...], is_causal: tuple[bool, ...]) -> torch.Tensor:
    """The ``(N, N)`` bool mask (True = attend) on the row-major flattened grid ``shape``."""
    axes = [naive_axis_neighbors(n, k, d, s, c)
            for n, k, d, s, c in zip(shape, kernel_size, dilation, stride, is_causal)]
    n_tot = math.prod(shape)
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    mask = torch.zeros(n_tot, n_tot, dtype=torch.bool)
    for qc in itertools.product(*[range(n) for n in shape]):
        qi = sum(c * st for c, st in zip(qc, strides))
        for kc in itertools.product(*[axes[a][qc[a]] for a in range(len(shape))]):
            mask[qi, sum(c * st for c, st in zip(kc, strides))] = True
    return mask


def naive_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, dilation=1,
                                 stride=1, is_causal=False, scale: float | None = None,
                                 return_lse: bool = False):
    """Neighborhood attention by materialising the mask and the full score matrix.

    Args:
        q: ``(B, *S, H, D)``; k: ``(B, *S, Hkv, D)``; v: ``(B, *S, Hkv, Dv)``; ``len(S)`` in 1..3.
        kernel_size, dilation, stride, is_causal: int/bool or per-dim tuples.
        scale: logit scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``(B, *S, H)``.

    Returns:
        ``out (B, *S, H, Dv)`` in q's dtype (computed in float64 for float64 input, else float32),
        and ``lse`` if asked.
    """
    spatial = tuple(q.shape[1:-2])
    rank = len(spatial)

    def tup(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank

    mask = naive_neighborhood_mask(spatial, tup(kernel_size), tup(dilation), tup(stride), tup(is_causal))
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    n = math.prod(spatial)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.reshape(B, n, H, D).to(ct).transpose(1, 2)  # (B, H, N, D)
    kf = k.reshape(B, n, Hkv, D).to(ct).transpose(1, 2)  # (B, Hkv, N, D)
    vf = v.reshape(B, n, Hkv, Dv).to(ct).transpose(1, 2)  # (B, Hkv, N, Dv)
    kf = kf.repeat_interleave(H // Hkv, dim=1)  # (B, H, N, D): query head h uses kv head h // G
    vf = vf.repeat_interleave(H // Hkv, dim=1)  # (B, H, N, Dv)
    s = (qf @ kf.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)  # (B, H, N, N)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, N); every row has its own query, so finite
    # masked probabilities are 0, and 0 * NaN = NaN: multiply only the finite values, then give the
    # non-finite ones (NaN, +inf, -inf) to exactly the queries whose window holds them
    finite = torch.isfinite(vf)
    out = torch.softmax(s, dim=-1) @ torch.where(finite, vf, 0.0)  # (B, H, N, Dv)
    seen = [(mask.to(ct) @ bad.to(ct)) > 0 for bad in (vf.isnan(), vf == math.inf, vf == -math.inf)]
    out = (out + torch.where(seen[1], math.inf, 0.0) + torch.where(seen[2], -math.inf, 0.0)
           + torch.where(seen[0], math.nan, 0.0))  # inf + -inf = NaN, as the IEEE sum would give
    out = out.transpose(1, 2).reshape(B, *spatial, H, Dv).to(q.dtype)  # (B, *S, H, Dv)
    if return_lse:
        return out, lse.transpose(1, 2).reshape(B, *spatial, H)  # (B, *S, H), float32 (float64 for float64)
    return out
