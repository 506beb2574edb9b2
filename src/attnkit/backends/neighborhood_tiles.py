"""Tile plans for neighborhood attention: which queries form a tile, which keys form its halo.

"Faster Neighborhood Attention" (arXiv 2403.04690) §3: tile the queries spatially and load,
per query tile, the haloed key region covering the union of its queries' windows. Because
window starts and ends are non-decreasing along an axis (local.md §1.2), that union is one
interval per axis and dilation group, so a tile's keys are a small dense box.

Per axis we build tiles inside each dilation group (in-group coordinates), pad the last tile
of a group (padded query slots repeat a real query; their results are dropped and their
gradient input is zeroed) and give every tile a halo of one fixed size ``Hs`` so a whole
chunk of tiles is one batched dense attention. The multi-dim plan is the Cartesian product.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from attnkit.ops.neighborhood_mask import axis_windows


@dataclass(frozen=True)
class AxisTiles:
    """Tiles of one axis (all long/bool tensors; ``nt`` tiles of ``T`` query slots, halos of ``Hs``).

    Attributes:
        qpos: ``(nt, T)`` axis position of each query slot (padded slots repeat the group's last query).
        qvalid: ``(nt, T)`` False for padded slots.
        kpos: ``(nt, Hs)`` axis position of each halo key (out-of-group slots clamped, and masked).
        allowed: ``(nt, T, Hs)`` whether slot ``r`` may attend to halo key ``h``.
        full: ``(nt,)`` every slot may attend to every halo key (no mask needed).
        inv: ``(n,)`` flat ``tile * T + slot`` of each real position.
    """

    T: int
    Hs: int
    qpos: torch.Tensor
    qvalid: torch.Tensor
    kpos: torch.Tensor
    allowed: torch.Tensor
    full: torch.Tensor
    inv: torch.Tensor

    @property
    def nt(self) -> int:
        return self.qpos.shape[0]


def _halo_size(n: int, k: int, d: int, s: int, c: bool, T: int) -> int:
    """Largest extent of a tile's key union; windows are monotone, so it spans first start..last end."""
    _g, _u, _L, start, end = axis_windows(n, k, d, s, c)
    need = 0
    for grp in range(d):
        st, en = start[grp::d], end[grp::d]
        t0 = torch.arange(0, st.numel(), T)
        last = (t0 + T - 1).clamp(max=st.numel() - 1)
        need = max(need, int((en[last] - st[t0]).max()))
    return need


@functools.lru_cache(maxsize=256)
def axis_tiles(n: int, k: int, d: int, s: int, c: bool, T: int) -> AxisTiles:
    """Build the tiles of one axis (cached; cost O(n * (T + Hs)))."""
    _g, _u, _L, start, end = axis_windows(n, k, d, s, c)
    Hs = _halo_size(n, k, d, s, c, T)
    qpos, qvalid, kpos, allowed = [], [], [], []
    inv = torch.empty(n, dtype=torch.long)
    base = 0  # tiles built so far
    for grp in range(d):
        st, en = start[grp::d], end[grp::d]  # (Lg,) window per in-group coordinate
        Lg = st.numel()
        uu = torch.arange(0, Lg, T)[:, None] + torch.arange(T)  # (ntg, T) in-group query coords
        valid = uu < Lg
        uc = uu.clamp(max=Lg - 1)  # padded slots repeat the group's last real query
        lo, hi = st[uc[:, 0]], en[uc[:, -1]]  # windows are monotone: union = [first start, last end)
        hs = torch.minimum(lo, torch.full_like(lo, Lg - Hs)).clamp(min=0)  # fixed-size halo covering it
        assert bool((hs <= lo).all() and (hs + Hs >= hi).all()), "halo does not cover the tile's windows"
        tt = hs[:, None] + torch.arange(Hs)  # (ntg, Hs) in-group key coords
        qpos.append(grp + d * uc)
        qvalid.append(valid)
        kpos.append(grp + d * tt.clamp(max=Lg - 1))
        allowed.append((tt[:, None, :] >= st[uc][:, :, None]) & (tt[:, None, :] < en[uc][:, :, None])
                       & (tt < Lg)[:, None, :])  # (ntg, T, Hs)
        flat = base * T + torch.arange(uu.numel())
        inv[grp + d * uu[valid]] = flat[valid.reshape(-1)]
        base += uu.shape[0]
    allowed_t = torch.cat(allowed)
    return AxisTiles(T, Hs, torch.cat(qpos), torch.cat(qvalid), torch.cat(kpos), allowed_t,
                     allowed_t.flatten(1).all(1), inv)


def _outer(parts: list[torch.Tensor], strides: list[int]) -> torch.Tensor:
    """``sum_a parts[a] * strides[a]`` over the product of per-axis ``(C, n_a)`` tables -> ``(C, prod n_a)``."""
    C = parts[0].shape[0]
    acc = torch.zeros(C, 1, dtype=torch.long)
    for p, st in zip(parts, strides):
        acc = (acc[:, :, None] + p[:, None, :] * st).reshape(C, -1)
    return acc


def _and_outer(parts: list[torch.Tensor]) -> torch.Tensor:
    """AND over the Cartesian product of per-axis ``(C, n_a)`` bool tables -> ``(C, prod n_a)``."""
    C = parts[0].shape[0]
    acc = torch.ones(C, 1, dtype=torch.bool)
    for p in parts:
        acc = (acc[:, :, None] & p[:, None, :]).reshape(C, -1)
    return acc


@dataclass(frozen=True)
class TilePlan:
    """Multi-dim tile plan: per-axis tiles combined as a Cartesian product.

    Tiles are ordered with full (unmasked) tiles first, so most chunks of a blocked pattern run
    without any mask. ``inv[p]`` is the position of real token ``p`` in the tile-major layout
    ``(order position * M + slot)``.
    """

    shape: tuple[int, ...]
    axes: tuple[AxisTiles, ...]
    order: torch.Tensor  # (nt,) tile ids, full tiles first
    n_full: int
    inv: torch.Tensor  # (N,)

    @property
    def nt(self) -> int:
        return self.order.numel()

    @property
    def M(self) -> int:
        return math.prod(a.T for a in self.axes)

    @property
    def Hk(self) -> int:
        return math.prod(a.Hs for a in self.axes)

    @property
    def tile(self) -> tuple[int, ...]:
        return tuple(a.T for a in self.axes)

    def _axis_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for a in reversed(self.axes):
            out.append(ids % a.nt)
            ids = ids // a.nt
        return out[::-1]

    def _strides(self) -> list[int]:
        return [math.prod(self.shape[a + 1:]) for a in range(len(self.shape))]

    def chunk(self, lo: int, hi: int):
        """Tables for tiles ``order[lo:hi]``: q index ``(C*M,)``, q valid ``(C*M,)``, k index ``(C*Hk,)``,
        allowed ``(C, M, Hk)`` or None when every tile of the chunk is full."""
        ids = self._axis_ids(self.order[lo:hi])
        strides = self._strides()
        qidx = _outer([a.qpos[t] for a, t in zip(self.axes, ids)], strides).reshape(-1)
        qvalid = _and_outer([a.qvalid[t] for a, t in zip(self.axes, ids)]).reshape(-1)
        kidx = _outer([a.kpos[t] for a, t in zip(self.axes, ids)], strides).reshape(-1)
        if hi <= self.n_full:
            return qidx, qvalid, kidx, None
        C = hi - lo
        allowed = torch.ones(C, 1, 1, dtype=torch.bool)
        for a, t in zip(self.axes, ids):  # (C, M_prev, Hk_prev) x (C, T_a, Hs_a) -> (C, M_prev*T_a, Hk_prev*Hs_a)
            m = a.allowed[t]
            allowed = (allowed[:, :, None, :, None] & m[:, None, :, None, :]).reshape(
                C, allowed.shape[1] * a.T, allowed.shape[2] * a.Hs)
        return qidx, qvalid, kidx, allowed


@functools.lru_cache(maxsize=128)
def make_plan(shape: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...],
              stride: tuple[int, ...], is_causal: tuple[bool, ...], tile: tuple[int, ...]) -> TilePlan:
    axes = tuple(axis_tiles(n, k, d, s, c, T)
                 for n, k, d, s, c, T in zip(shape, kernel_size, dilation, stride, is_causal, tile))
    nts = [a.nt for a in axes]
    nt = math.prod(nts)
    full = torch.ones(1, dtype=torch.bool)
    for a in axes:
        full = (full[:, None] & a.full[None, :]).reshape(-1)
    order = torch.cat([torch.nonzero(full).flatten(), torch.nonzero(~full).flatten()])
    pos_of_tile = torch.empty(nt, dtype=torch.long)
    pos_of_tile[order] = torch.arange(nt)
    # real token -> (tile id, slot) from per-axis (tile, slot) pairs
    tid = torch.zeros(1, dtype=torch.long)
    slot = torch.zeros(1, dtype=torch.long)
    for a in axes:
        ta, ra = a.inv // a.T, a.inv % a.T
        tid = (tid[:, None] * a.nt + ta[None, :]).reshape(-1)
        slot = (slot[:, None] * a.T + ra[None, :]).reshape(-1)
    M = math.prod(a.T for a in axes)
    inv = pos_of_tile[tid] * M + slot
    return TilePlan(tuple(shape), axes, order, int(full.sum()), inv)


# Cost of one (tile, head) call of the fused kernel, in units of one score element: measured on
# a 2-core x86 CPU (per-call overhead of the CPU flash kernel is worth ~8k score elements).
_CALL_OVERHEAD = 8192


def _candidates(n: int, d: int, s: int) -> list[int]:
    L = -(-n // d)
    cands = {L}
    t = 1
    while t < L:
        cands.add(t)
        t *= 2
    t = s
    while 1 < s and t < L:
        cands.add(t)
        t *= 2
    return sorted(cands)


@functools.lru_cache(maxsize=128)
def choose_tile(shape: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...],
                stride: tuple[int, ...], is_causal: tuple[bool, ...]) -> tuple[int, ...]:
    """Pick per-axis tile sizes minimising ``n_tiles * (overhead + M * Hk)`` (computed score elements)."""
    per_axis = []
    for n, k, d, s, c in zip(shape, kernel_size, dilation, stride, is_causal):
        opts = []
        for T in _candidates(n, d, s):
            nt = sum(-(-len(range(g, n, d)) // T) for g in range(d))
            opts.append((T, nt, _halo_size(n, k, d, s, c, T)))
        per_axis.append(opts)
    best, best_cost = None, float("inf")

    def rec(a: int, chosen: list[tuple[int, int, int]]) -> None:
        nonlocal best, best_cost
        if a == len(per_axis):
            nt = math.prod(o[1] for o in chosen)
            M = math.prod(o[0] for o in chosen)
            Hk = math.prod(o[2] for o in chosen)
            cost = nt * (_CALL_OVERHEAD + M * Hk)
            if M > 512:  # keep a tile's score block cache-sized
                cost *= 1.0 + (M - 512) / 512
            if cost < best_cost:
                best, best_cost = tuple(o[0] for o in chosen), cost
            return
        for o in per_axis[a]:
            rec(a + 1, [*chosen, o])

    rec(0, [])
    return best
