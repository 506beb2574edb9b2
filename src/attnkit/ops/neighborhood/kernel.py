"""Neighborhood attention on the compiled tile kernel (``kernels/flash.py``), forward and backward.

"Faster Neighborhood Attention" (arXiv 2403.04690) §3: tile the queries spatially and attend each
query tile to the keys its windows cover. The tile kernel walks tiles of *consecutive* tokens, so the
tokens are first put in tile-major order: queries in boxes of ``tq`` (one box per kernel query tile,
``prod(tq)`` rows) and keys in boxes of ``tk`` (``prod(tk)`` keys, a multiple of 16), each box inside
one dilation group (in-group coordinates, as NATTEN's rule is per group). Then a query box's windows
cover a few key boxes per axis; the NA mask is a product over axes (arXiv 2204.07143 §3, 2209.15001
§3), so each (query box, key box) pair is empty, full, or partial with a bitmask that is the Kronecker
product of per-axis tile masks. Boxes past a group's end are padded (padded queries attend nothing;
padded keys are masked), and the kernel's outputs are read back in token order.

The box sizes come from a small cost model (computed query-key pairs + a fixed cost per key span and
per query tile); plans are cached per pattern. Costs one gather of q, k, v into tile order and one of
the outputs back (none in 1-D without dilation, where tile order is token order).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from attnkit.kernels.flash import SPAN, TileList, flash_attention, pack_bits
from attnkit.masks.neighborhood import axis_windows

_SPAN_COST = 1024  # fixed cost of one key span (packing setup, two GEMM calls), in computed pairs
_TILE_COST = 2048  # fixed cost of one query tile (packing Q, writing results), in computed pairs


def _pow2_upto(n: int) -> list[int]:
    out, t = [], 1
    while t <= n:
        out.append(t)
        t *= 2
    return out


def _axis_slots(n: int, d: int, t: int) -> torch.Tensor:
    """``(nt, t)`` axis position of each slot of each box (boxes inside dilation groups), -1 = padding."""
    parts = []
    for g in range(d):
        L = len(range(g, n, d))
        u = torch.arange(-(-L // t) * t).view(-1, t)  # (ntg, t) in-group coordinates
        parts.append(torch.where(u < L, g + d * u, -1))
    return torch.cat(parts)


@functools.lru_cache(maxsize=1024)
def _axis_stats(n: int, k: int, d: int, s: int, c: bool, tq: int, tk: int) -> tuple[int, int, int, float]:
    """``(query boxes, key boxes, pairs, mean pairs per query box)`` of one axis, from window intervals."""
    _g, _u, _L, start, end = axis_windows(n, k, d, s, c)
    qs = _axis_slots(n, d, tq)
    valid = qs >= 0
    pos = qs.clamp(min=0)
    lo = torch.where(valid, start[pos], 1 << 40).amin(1)
    hi = torch.where(valid, end[pos], -1).amax(1)
    cnt = (hi + tk - 1) // tk - lo // tk  # key boxes of the group intersecting [lo, hi)
    nkt = sum(-(-len(range(g, n, d)) // tk) for g in range(d))
    return qs.shape[0], nkt, int(cnt.sum()), float(cnt.float().mean())


@functools.lru_cache(maxsize=1024)
def _axis_pairs(n: int, k: int, d: int, s: int, c: bool, tq: int, tk: int):
    """Non-empty (query box, key box) pairs of one axis: per query box a list of ``(key box, full, pattern)``,
    and the distinct ``(tq, tk)`` bool patterns."""
    _g, _u, _L, start, end = axis_windows(n, k, d, s, c)
    qs, ks = _axis_slots(n, d, tq), _axis_slots(n, d, tk)
    qv, kv = qs >= 0, ks >= 0
    qp, kp = qs.clamp(min=0), ks.clamp(min=0)
    # per box: its group and first in-group coordinate (boxes never cross a group)
    kgrp, ku0 = kp[:, 0] % d, kp[:, 0] // d
    lo = torch.where(qv, start[qp], 1 << 40).amin(1)
    hi = torch.where(qv, end[qp], -1).amax(1)
    qgrp = qp[:, 0] % d
    first = torch.tensor([0, *itertools.accumulate(-(-len(range(g, n, d)) // tk) for g in range(d))])
    rows, pats, keyed = [], [], {}
    for t in range(qs.shape[0]):
        g = int(qgrp[t])
        j0 = int(first[g]) + int(lo[t]) // tk
        j1 = int(first[g]) + (int(hi[t]) + tk - 1) // tk
        row = []
        for j in range(j0, j1):
            assert int(kgrp[j]) == g and int(ku0[j]) == (j - int(first[g])) * tk
            ku = ku0[j] + torch.arange(tk)  # (tk,) in-group key coordinates
            a = (ku[None, :] >= start[qp[t]][:, None]) & (ku[None, :] < end[qp[t]][:, None])
            a &= qv[t][:, None] & kv[j][None, :]  # (tq, tk)
            if not bool(a.any()):
                continue
            key = a.numpy().tobytes()
            if key not in keyed:
                keyed[key] = len(pats)
                pats.append(a)
            row.append((j, bool(a.all()), keyed[key]))
        rows.append(row)
    return qs, ks, rows, pats


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """What the kernel path runs: the tile list over tile-ordered tokens and the orders themselves.

    ``q_src``/``k_src``: token feeding each slot of the query / key order (padding repeats token 0),
    None when the order is the token order (then ``nq == N``); ``q_inv``: slot of each token.
    """

    tl: TileList
    tq: tuple[int, ...]
    tk: tuple[int, ...]
    q_src: torch.Tensor | None
    q_inv: torch.Tensor | None
    k_src: torch.Tensor | None
    nq: int
    nk: int

    @property
    def bq(self) -> int:
        return self.tl.bq

    @property
    def bk(self) -> int:
        return self.tl.bk


def choose_boxes(shape, kernel_size, dilation, stride, is_causal, bq_target: int = 64):
    """Per-axis query and key box sizes minimising computed pairs + span and tile costs."""
    return _choose(tuple(shape), tuple(kernel_size), tuple(dilation), tuple(stride), tuple(is_causal), bq_target)


@functools.lru_cache(maxsize=128)
def _choose(shape, kernel_size, dilation, stride, is_causal, bq_target):
    axes = list(zip(shape, kernel_size, dilation, stride, is_causal))
    cand = [_pow2_upto(max(16, 2 * -(-n // d))) for n, _k, d, _s, _c in axes]
    best, best_cost = None, math.inf
    tqs = [t for t in itertools.product(*cand) if bq_target // 2 <= math.prod(t) <= bq_target]
    if not tqs:  # a grid smaller than one tile: one box over everything
        tqs = [tuple(min(c[-1], 1 << max(0, (-(-n // d) - 1).bit_length())) for c, (n, _k, d, _s, _c) in
                     zip(cand, axes))]
    tks = [t for t in itertools.product(*cand) if math.prod(t) in (16, 32, 64, 128)]
    for tq in tqs:
        for tk in tks:
            nqt, pairs, pq, mean_last = 1, 1, 1, 1.0
            for (n, k, d, s, c), a, b in zip(axes, tq, tk):
                nq_a, _nk, p_a, m_a = _axis_stats(n, k, d, s, c, a, b)
                nqt *= nq_a
                pairs *= p_a
                pq *= a * b * p_a
                mean_last = m_a
            bk = math.prod(tk)
            run = max(1.0, min(mean_last, SPAN // bk))
            cost = pq + _SPAN_COST * pairs / run + _TILE_COST * nqt
            if cost < best_cost:
                best, best_cost = (tq, tk), cost
    return best


def _order(slots: list[torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token of each slot of a box-major order (boxes row-major over axes, then slots row-major):
    ``(src (n_slots,) with padding -> -1)``, from per-axis ``(nt_a, t_a)`` position tables."""
    r = len(slots)
    strides = [math.prod(shape[a + 1:]) for a in range(r)]
    src = torch.zeros((1,) * (2 * r), dtype=torch.long)
    valid = torch.ones((1,) * (2 * r), dtype=torch.bool)
    for a, sl in enumerate(slots):
        view = [1] * (2 * r)
        view[a], view[r + a] = sl.shape
        src = src + (sl.clamp(min=0) * strides[a]).view(view)
        valid = valid & (sl >= 0).view(view)
    return src.reshape(-1), valid.reshape(-1)


@functools.lru_cache(maxsize=32)
def kernel_plan(shape, kernel_size, dilation, stride, is_causal, bq_target: int = 64) -> KernelPlan:
    """The (cached) kernel plan of one NA pattern (1-D/2-D/3-D, dilation, stride, causal)."""
    tq, tk = _choose(shape, kernel_size, dilation, stride, is_causal, bq_target)
    per = [_axis_pairs(n, k, d, s, c, a, b)
           for (n, k, d, s, c), a, b in zip(zip(shape, kernel_size, dilation, stride, is_causal), tq, tk)]
    nkt_axes = [p[1].shape[0] for p in per]
    bq, bk = math.prod(tq), math.prod(tk)
    cols, slots, row_counts = [], [], []
    combos: dict[tuple[int, ...], int] = {}
    for qt in itertools.product(*[range(p[0].shape[0]) for p in per]):
        lists = [p[2][t] for p, t in zip(per, qt)]
        n_here = 0
        for ent in itertools.product(*lists):
            j = 0
            for (jj, _f, _p), nk_a in zip(ent, nkt_axes):
                j = j * nk_a + jj
            cols.append(j)
            if all(f for _j, f, _p in ent):
                slots.append(-1)
            else:
                key = tuple(p for _j, _f, p in ent)
                slots.append(combos.setdefault(key, len(combos)))
            n_here += 1
        row_counts.append(n_here)
    masks = []
    for key in combos:  # Kronecker product of the per-axis patterns: rows (s_0, s_1, ..), cols (c_0, c_1, ..)
        m = torch.ones(1, 1, dtype=torch.bool)
        for p, pid in zip(per, key):
            a = p[3][pid]
            m = (m[:, None, :, None] & a[None, :, None, :]).reshape(m.shape[0] * a.shape[0], m.shape[1] * a.shape[1])
        masks.append(m)
    bits = (pack_bits(torch.stack(masks), bk) if masks else
            torch.zeros(1, bq, -(-bk // 64), dtype=torch.long))[None, None].contiguous()  # (1, 1, P, bq, words)
    row_ptr = torch.zeros(1, 1, len(row_counts) + 1, dtype=torch.long)
    row_ptr[0, 0, 1:] = torch.tensor(row_counts).cumsum(0)
    computed = len(cols) * bq * bk  # per (batch, head), padding included
    tl = TileList(bq, bk, row_ptr, torch.tensor(cols, dtype=torch.long), torch.tensor(slots, dtype=torch.long),
                  bits, computed)
    n = math.prod(shape)
    q_src, q_ok = _order([p[0] for p in per], shape)
    k_src, k_ok = _order([p[1] for p in per], shape)
    q_inv = torch.empty(n, dtype=torch.long)
    q_inv[q_src[q_ok]] = torch.arange(q_src.numel())[q_ok]
    nq, nk = q_src.numel(), k_src.numel()
    # padding only at the end of an order that is otherwise the token order: the kernel takes the
    # ragged last tile itself, so no reordering at all
    if torch.equal(q_src[:n], torch.arange(n)) and not bool(q_ok[n:].any()):
        q_src, q_inv, nq = None, None, n
    if torch.equal(k_src[:n], torch.arange(n)) and not bool(k_ok[n:].any()):
        k_src, nk = None, n
    return KernelPlan(tl, tq, tk, q_src, q_inv, k_src, nq, nk)


def _gather_heads_first(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, idx)`` for ``x (B, N, H, E)``, written as ``(B, H, len(idx), E)`` memory and returned
    as a ``(B, len(idx), H, E)`` view."""
    return x.transpose(1, 2).index_select(2, idx).transpose(1, 2)


def neighborhood_kernel(q, k, v, plan: KernelPlan, scale: float):
    """q ``(B, N, H, D)``, k/v ``(B, N, Hkv, D|Dv)`` (flattened row-major, any strides) -> ``out (B, N, H, Dv)``
    in q's dtype and ``lse (B, N, H)`` float32; differentiable (the kernel's backward, gathers' adjoints)."""
    # gathers to tile order write heads-first memory, (B, H, n, .): the kernel reads each head's rows in runs
    # (and would otherwise copy K / V to that layout itself, a second pass over them)
    qt = q if plan.q_src is None else _gather_heads_first(q, plan.q_src.to(q.device))  # (B, nq, H, D) tile order
    if plan.k_src is None:
        kt, vt = k, v
    else:
        idx = plan.k_src.to(k.device)
        kt, vt = _gather_heads_first(k, idx), _gather_heads_first(v, idx)  # (B, nk, Hkv, D|Dv) tile order
    out, lse = flash_attention(qt, kt, vt, plan.tl, scale)
    if plan.q_inv is not None:
        inv = plan.q_inv.to(q.device)
        out, lse = out.index_select(1, inv), lse.index_select(1, inv)  # back to token order
    return out, lse
