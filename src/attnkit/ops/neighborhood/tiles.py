"""Tile plans for neighborhood attention: which queries form a tile, which keys form its halo.

"Faster Neighborhood Attention" (arXiv 2403.04690) §3: tile the queries spatially and load,
per query tile, the haloed key region covering the union of its queries' windows. Because
window starts and ends are non-decreasing along an axis (NATTEN's rule), that union is one
interval per axis and dilation group, so a tile's keys are a small dense box.

Per axis we build tiles inside each dilation group (in-group coordinates), pad the last tile
of a group (padded query slots repeat a real query; their results are dropped and their
gradient input is zeroed) and give every tile a halo of one fixed size ``Hs`` so a whole
chunk of tiles is one batched dense attention. The multi-dim plan is the Cartesian product.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from attnkit.masks.neighborhood import axis_windows


@dataclass(frozen=True)
class AxisTiles:
    """Tiles of one axis (all long/bool tensors; ``nt`` tiles of ``T`` query slots, halos of ``Hs``).

    Attributes:
        qpos: ``(nt, T)`` axis position of each query slot (padded slots repeat the group's last query).
        qvalid: ``(nt, T)`` False for padded slots.
        kpos: ``(nt, Hs)`` axis position of each halo key (out-of-group slots clamped, and masked).
        inv: ``(n,)`` flat ``tile * T + slot`` of each real position.
        pattern: ``(nt,)`` id of the tile's mask in ``patterns``; interior tiles share one
            (translation invariance), so there are only a few distinct masks per axis.
        patterns: ``(P, T, Hs)`` the distinct tile masks: slot ``r`` may attend to halo key ``h``.
    """

    T: int
    Hs: int
    qpos: torch.Tensor
    qvalid: torch.Tensor
    kpos: torch.Tensor
    inv: torch.Tensor
    pattern: torch.Tensor
    patterns: torch.Tensor

    @property
    def nt(self) -> int:
        return self.qpos.shape[0]

    @property
    def full(self) -> torch.Tensor:
        """``(nt,)`` every slot may attend to every halo key (no mask needed)."""
        return self.patterns.flatten(1).all(1)[self.pattern]

    @property
    def allowed(self) -> torch.Tensor:
        """``(nt, T, Hs)`` the mask of every tile (materialised on demand; for tests)."""
        return self.patterns[self.pattern]


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


_TABLE_BYTES = 64 << 20  # largest per-tile mask table a plan keeps (else chunks hold one class)


@functools.lru_cache(maxsize=256)
def axis_tiles(n: int, k: int, d: int, s: int, c: bool, T: int) -> AxisTiles:
    """Build the tiles of one axis (cached; cost O(n + distinct patterns * T * Hs))."""
    _g, _u, _L, start, end = axis_windows(n, k, d, s, c)
    Hs = _halo_size(n, k, d, s, c, T)
    qpos, qvalid, kpos, rel = [], [], [], []
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
        # a tile's mask is fixed by its slots' windows and the group end, relative to the halo start
        rel.append(torch.cat([st[uc] - hs[:, None], en[uc] - hs[:, None], (Lg - hs).clamp(max=Hs)[:, None]], 1))
        flat = base * T + torch.arange(uu.numel())
        inv[grp + d * uu[valid]] = flat[valid.reshape(-1)]
        base += uu.shape[0]
    uniq, pattern = torch.unique(torch.cat(rel), dim=0, return_inverse=True)  # (P, 2T + 1)
    h = torch.arange(Hs)
    patterns = ((h >= uniq[:, :T, None]) & (h < uniq[:, T:2 * T, None])
                & (h < uniq[:, 2 * T:, None]))  # (P, T, Hs)
    return AxisTiles(T, Hs, torch.cat(qpos), torch.cat(qvalid), torch.cat(kpos), inv, pattern, patterns)


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


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Multi-dim tile plan: per-axis tiles combined as a Cartesian product.

    Tiles are grouped by mask class (the tuple of per-axis mask patterns); interior tiles share
    one class, so there are few. Full classes (every slot sees every halo key) come first and run
    with no mask at all. A chunk of partial tiles takes its masks from a per-tile table (built
    once per plan and dtype), or, when that table would be large, holds tiles of one class and
    broadcasts that class's single ``(M, Hk)`` mask.
    ``inv[p]`` is the position of real token ``p`` in the tile-major layout ``(order position * M + slot)``.
    """

    shape: tuple[int, ...]
    axes: tuple[AxisTiles, ...]
    order: torch.Tensor  # (nt,) tile ids grouped by class, full classes first
    segments: tuple[tuple[int, int, int], ...]  # (lo, hi, class) runs of `order` sharing one mask
    n_full: int  # tiles order[:n_full] need no mask
    inv: torch.Tensor  # (N,)
    _cache: dict = field(default_factory=dict, repr=False)

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

    def _class_patterns(self, cls: int) -> list[int]:
        out = []
        for a in reversed(self.axes):
            out.append(cls % a.patterns.shape[0])
            cls //= a.patterns.shape[0]
        return out[::-1]

    def allowed(self, cls: int) -> torch.Tensor | None:
        """The ``(M, Hk)`` mask shared by every tile of class ``cls``; None when it is all True."""
        acc = torch.ones(1, 1, dtype=torch.bool)
        for a, pid in zip(self.axes, self._class_patterns(cls)):
            m = a.patterns[pid]  # (T_a, Hs_a)
            acc = (acc[:, None, :, None] & m[None, :, None, :]).reshape(acc.shape[0] * a.T, acc.shape[1] * a.Hs)
        return None if bool(acc.all()) else acc

    def bias(self, cls: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Additive mask ``(1, 1, M, Hk)`` (0 / -inf) of class ``cls``, cached per dtype."""
        key = ("bias", cls, dtype, str(device))
        if key not in self._cache:
            m = self.allowed(cls)
            self._cache[key] = None if m is None else torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(
                ~m.to(device), float("-inf"))[None, None]
        return self._cache[key]

    def chunk(self, lo: int, hi: int, cls: int | None) -> Chunk:
        """Index tables of tiles ``order[lo:hi]`` (cached); ``cls`` when they share one mask class."""
        key = ("chunk", lo, hi, cls)
        if key not in self._cache:
            ids = self._axis_ids(self.order[lo:hi])
            strides = [math.prod(self.shape[a + 1:]) for a in range(len(self.shape))]
            qidx = _outer([a.qpos[t] for a, t in zip(self.axes, ids)], strides).reshape(-1)
            qvalid = _and_outer([a.qvalid[t] for a, t in zip(self.axes, ids)]).reshape(-1)
            kidx = _outer([a.kpos[t] for a, t in zip(self.axes, ids)], strides).reshape(-1)
            C = hi - lo
            all_valid = bool(qvalid.all())
            self._cache[key] = Chunk(lo, hi, cls, qidx, qvalid, kidx, all_valid,
                                     _affine(qidx.view(C, self.M)) if all_valid else None,
                                     _affine(kidx.view(C, self.Hk)))
        return self._cache[key]

    def chunks(self, max_tiles: int, table_bytes: int | None = None) -> list[Chunk]:
        """Chunks of at most ``max_tiles`` tiles; full tiles never share a chunk with partial ones.

        Partial tiles of different classes share chunks when the per-tile mask table fits in
        ``table_bytes`` (fewer, larger kernel calls); otherwise each chunk holds one class.
        """
        table_bytes = _TABLE_BYTES if table_bytes is None else table_bytes
        key = ("chunks", max_tiles, table_bytes)
        if key not in self._cache:
            if (self.nt - self.n_full) * self.M * self.Hk * 4 <= table_bytes:
                runs = [r for r in ((0, self.n_full, None), (self.n_full, self.nt, None)) if r[1] > r[0]]
            else:
                runs = list(self.segments)
            self._cache[key] = [self.chunk(c0, min(hi, c0 + max_tiles), cls)
                                for lo, hi, cls in runs for c0 in range(lo, hi, max_tiles)]
        return self._cache[key]

    def chunk_bias(self, ch: Chunk, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Additive mask of a chunk: None (full tiles), ``(1, 1, M, Hk)`` (one class) or ``(C, 1, M, Hk)``."""
        if ch.hi <= self.n_full:
            return None
        if ch.cls is not None:
            return self.bias(ch.cls, dtype, device)
        key = ("table", dtype, str(device))
        if key not in self._cache:  # per-tile masks of all partial tiles, in `order`
            cls_of = self._cache.setdefault("cls_of", torch.tensor(
                [c for lo, hi, c in self.segments for _ in range(lo, hi)]))
            uniq = sorted(set(cls_of[self.n_full:].tolist()))
            stack = torch.stack([self.bias(c, dtype, device)[0] for c in uniq])  # (U, 1, M, Hk)
            pos = torch.tensor([uniq.index(c) for c in cls_of[self.n_full:].tolist()], device=device)
            self._cache[key] = stack.index_select(0, pos)  # (nt - n_full, 1, M, Hk)
        return self._cache[key][ch.lo - self.n_full:ch.hi - self.n_full]


@dataclass(frozen=True)
class Chunk:
    """Index tables of a run of tiles ``order[lo:hi]`` (flat token indices, row-major).

    ``qaff``/``kaff`` are ``(offset, tile_step, row_step)`` when the chunk's query (key) rows
    are an affine grid of token indices (1-D patterns: consecutive tiles and halos): the chunk
    is then a strided view of the input and needs no gather.
    """

    lo: int
    hi: int
    cls: int | None  # the tiles' shared mask class, or None (mixed classes / unknown)
    qidx: torch.Tensor  # (C*M,)
    qvalid: torch.Tensor  # (C*M,)
    kidx: torch.Tensor  # (C*Hk,)
    all_valid: bool
    qaff: tuple[int, int, int] | None
    kaff: tuple[int, int, int] | None


def _affine(idx: torch.Tensor) -> tuple[int, int, int] | None:
    """``(off, cs, rs)`` if ``idx[c, r] == off + c*cs + r*rs`` for the ``(C, R)`` table ``idx``, else None."""
    C, R = idx.shape
    off = int(idx[0, 0])
    cs = int(idx[1, 0] - off) if C > 1 else 0
    rs = int(idx[0, 1] - off) if R > 1 else 1
    if cs < 0 or rs <= 0:
        return None
    expect = off + torch.arange(C)[:, None] * cs + torch.arange(R)[None, :] * rs
    return (off, cs, rs) if torch.equal(idx, expect) else None


@functools.lru_cache(maxsize=64)
def make_plan(shape: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...],
              stride: tuple[int, ...], is_causal: tuple[bool, ...], tile: tuple[int, ...]) -> TilePlan:
    """Build (and cache) the tile plan of one pattern for the given per-axis tile sizes."""
    axes = tuple(axis_tiles(n, k, d, s, c, T)
                 for n, k, d, s, c, T in zip(shape, kernel_size, dilation, stride, is_causal, tile))
    nt = math.prod(a.nt for a in axes)
    cls = torch.zeros(1, dtype=torch.long)  # per tile id: class = ravel of per-axis pattern ids
    full = torch.ones(1, dtype=torch.bool)
    for a in axes:
        cls = (cls[:, None] * a.patterns.shape[0] + a.pattern[None, :]).reshape(-1)
        full = (full[:, None] & a.full[None, :]).reshape(-1)
    # full classes first; classes by their first tile, so a 1-D plan keeps tiles in token order
    first = torch.full((int(cls.max()) + 1,), nt, dtype=torch.long).scatter_reduce_(0, cls, torch.arange(nt), "amin")
    order = torch.argsort(first[cls] + (~full).long() * nt, stable=True)
    cls_sorted = cls[order].tolist()
    segments, lo = [], 0
    for i in range(1, nt + 1):
        if i == nt or cls_sorted[i] != cls_sorted[lo]:
            segments.append((lo, i, cls_sorted[lo]))
            lo = i
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
    return TilePlan(tuple(shape), axes, order, tuple(segments), int(full.sum()), inv)


# Fixed cost of one tile (per head) in units of one score element, fitted on a 2-core x86 CPU
# (fused-kernel setup plus gathering and scattering the tile's rows): ~16k score elements.
_CALL_OVERHEAD = 16384


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
