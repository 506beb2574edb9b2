"""Naive module twins of the cross-family modules registered in a second pass (Cambrian-1's SVA).

Obvious code, torch only, the test oracle: the module's forward recomputed from its parameters with plain
tensor code and the op twins of :mod:`attnkit.reference.naive_cross` (scores materialised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.reference.naive_cross import naive_cell_local_attention


def naive_cambrian_sva_module(m, maps, queries=None):
    """Cambrian-1's SVA (arXiv 2406.16860, §3.1): ``maps`` one ``(B, mL, mL, C_e)`` tensor or a list of them,
    optional ``queries (B, L*L, C)`` -> ``(B, L*L, C)``: grid queries plus the cell-local attention over every
    encoder's map, output projection, residual on the queries."""
    maps = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    b, h = maps[0].shape[0], m.num_heads
    q0 = m.queries.expand(b, -1, -1) if queries is None else queries                  # (B, L*L, C)
    q = F.linear(q0, m.q_proj.weight, m.q_proj.bias)
    q = q.reshape(b, q0.shape[1], h, -1)                                              # (B, L*L, H, D)
    feats = []
    for f, kp, vp in zip(maps, m.k_proj, m.v_proj):
        k = F.linear(f, kp.weight, kp.bias).reshape(*f.shape[:3], h, -1)              # (B, Y, X, H, D)
        v = F.linear(f, vp.weight, vp.bias).reshape(*f.shape[:3], h, -1)
        feats.append((k, v))
    o = naive_cell_local_attention(q, feats, m.grid)                                  # (B, L*L, H, D)
    o = o.reshape(b, q0.shape[1], -1)                                                 # (B, L*L, C)
    return q0 + F.linear(o, m.out_proj.weight, m.out_proj.bias)
