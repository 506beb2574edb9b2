"""Naive twins of the second batch of sequence-family ops and modules: obvious loops, torch only.

Each function is the specification its fast op or module is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------- Combiner


def naive_combiner(q, k, v, *, segment, causal=False, scale=None):
    """Combiner-Fixed (arXiv 2107.05768, section 4.1) one query at a time.

    ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)`` -> ``(B, N, H, Dv)``. Query ``i`` of segment ``a = i // s``
    attends its own segment's keys directly (``j <= i`` when causal) and every other segment ``r``
    (``r < a`` when causal) through one summary: key ``max_{j in r} k_j``, value
    ``sum_{j in r} softmax_j(max_{j' in r} q_{j'} . k_j) v_j``; one softmax over both.
    """
    N, D = q.shape[1], q.shape[-1]
    s = segment
    scale = D ** -0.5 if scale is None else scale
    q = q * scale
    n = math.ceil(N / s)
    summ_k, summ_v = [], []
    for r in range(n):
        sl = slice(r * s, min(N, (r + 1) * s))
        qr, kr = q[:, sl].amax(1), k[:, sl].amax(1)  # (B, H, D)
        w = torch.softmax(torch.einsum("bhd,bjhd->bhj", qr, k[:, sl]), -1)
        summ_k.append(kr)
        summ_v.append(torch.einsum("bhj,bjhd->bhd", w, v[:, sl]))
    outs = []
    for i in range(N):
        a = i // s
        hi = min(N, (a + 1) * s) if not causal else i + 1
        direct = range(a * s, hi)
        regions = [r for r in range(n) if (r < a if causal else r != a)]
        keys = torch.stack([k[:, j] for j in direct] + [summ_k[r] for r in regions], 1)  # (B, M, H, D)
        vals = torch.stack([v[:, j] for j in direct] + [summ_v[r] for r in regions], 1)  # (B, M, H, Dv)
        p = torch.softmax(torch.einsum("bhd,bmhd->bhm", q[:, i], keys), -1)
        outs.append(torch.einsum("bhm,bmhd->bhd", p, vals))
    return torch.stack(outs, 1)  # (B, N, H, Dv)


def naive_combiner_module(m, x):
    """:class:`~attnkit.mechanisms.seq_combiner.CombinerAttention` with :func:`naive_combiner`."""
    B, N, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, m.num_heads, C // m.num_heads).unbind(2)
    o = naive_combiner(q, k, v, segment=m.segment, causal=m.causal)  # (B, N, H, D)
    return F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)
