"""Neighborhood-attention index rules (NATTEN semantics) and the NA pattern as a mask object.

Index rules follow "Faster Neighborhood Attention" (arXiv 2403.04690) and "Generalized
Neighborhood Attention" (arXiv 2504.16922), as the NATTEN library implements them (``docs/design.md`` §3):
per axis, dilation groups ``g = i mod d`` (in-group coordinate ``u = i div d``, group length
``L``), stride-group leaders, and a window ``[start, end)`` in in-group coordinates that is
shifted (non-causal) or clipped (causal) at the borders. Multi-dim patterns are the
Cartesian product of the per-axis rules.

This file is pure index arithmetic (no attention): the tiled backend builds its tables from
:func:`axis_windows`, flex uses :meth:`NeighborhoodMask.mask_mod`, and pictures/tests use
:meth:`NeighborhoodMask.to_dense` / :meth:`NeighborhoodMask.query`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import int_arg, per_dim
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask, offset_arg


def check_na_params(shape: tuple[int, ...], kernel_size: object, dilation: object = 1, stride: object = 1,
                    is_causal: object = False) -> tuple[tuple[int, ...], ...]:
    """Expand per-dim parameters and validate them against the spatial ``shape``.

    Returns ``(kernel_size, dilation, stride, is_causal)`` as tuples of length ``len(shape)``.
    Raises ValueError naming the argument for kernel > extent, ``dilation * kernel > extent``,
    ``stride > kernel`` and non-positive values (NATTEN's rules).
    """
    rank = len(shape)
    ks = per_dim("kernel_size", kernel_size, rank)
    ds = per_dim("dilation", dilation, rank)
    ss = per_dim("stride", stride, rank)
    cs = per_dim("is_causal", is_causal, rank, kind=bool)
    for a, (n, k, d, s) in enumerate(zip(shape, ks, ds, ss)):
        int_arg("kernel_size", k, 1)
        int_arg("dilation", d, 1)
        int_arg("stride", s, 1)
        if k > n:
            raise ValueError(f"kernel_size {k} is larger than the extent {n} of spatial dim {a}")
        if k * d > n:
            raise ValueError(f"dilation * kernel_size = {d} * {k} = {d * k} exceeds the extent {n} of "
                             f"spatial dim {a}: every dilation group needs at least kernel_size tokens")
        if s > k:
            raise ValueError(f"stride {s} is larger than kernel_size {k} in spatial dim {a}: "
                             f"some keys would be seen by no query")
    return ks, ds, ss, cs


def window_bounds(i: torch.Tensor, n: int, k: int, d: int = 1, s: int = 1, causal: bool = False):
    """Per query position ``i`` (any integer tensor) on an axis of length ``n``.

    Returns ``(g, u, L, start, end)``: dilation group, in-group coordinate, group length and the
    window ``[start, end)`` in in-group coordinates (NATTEN's 1-D rule). Pure tensor
    arithmetic, so it also runs inside flex's vmapped ``mask_mod``.
    """
    g = i % d
    u = i // d
    L = (n - g + d - 1) // d  # tokens in group g
    if causal:
        lead = torch.minimum((u // s) * s + (s - 1), L - 1)
        start = torch.clamp(lead - (k - 1), min=0)
        end = u + 1
    else:
        lead = torch.minimum((u // s) * s + s // 2, L - 1)
        start = torch.minimum(torch.clamp(lead - k // 2, min=0), L - k)
        end = start + k
    return g, u, L, start, end


def axis_windows(n: int, k: int, d: int = 1, s: int = 1, causal: bool = False):
    """:func:`window_bounds` for every position ``0..n-1`` of one axis (long tensors of shape ``(n,)``)."""
    return window_bounds(torch.arange(n), n, k, d, s, causal)


def axis_allowed(i: torch.Tensor, j: torch.Tensor, n: int, k: int, d: int, s: int, causal: bool) -> torch.Tensor:
    """Whether key position ``j`` is in the neighbourhood of query position ``i`` on one axis."""
    g, _u, _L, start, end = window_bounds(i, n, k, d, s, causal)
    t = j // d
    return (j % d == g) & (t >= start) & (t < end)


def _unravel(idx: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    coords = []
    for n in reversed(shape):  # row-major: last axis varies fastest
        coords.append(idx % n)
        idx = idx // n
    return coords[::-1]


@dataclass(frozen=True)
class NeighborhoodMask(Mask):
    """The NA/DiNA/causal-NA/GNA pattern on a row-major flattened grid, as an attnkit :class:`Mask`.

    ``True`` = may attend. Works with flex (``mask_mod``), ``ak.attention(mask=...)`` and the
    dense reference (``to_dense``), tile schedulers (``blocks``, exact) and pictures
    (``query``, ``picture``, ``ak.masks.show``). Composes with ``&``, ``|``, ``~``.

    Positions are absolute on the grid: the keys are the whole grid (``Nk == prod(shape)``) and query
    row ``q`` sits at flat position ``q + offset`` (``offset >= 0``, ``offset + Nq <= prod(shape)``),
    so the last ``m`` queries of a grid are ``offset = prod(shape) - m``.

    Example:
        >>> m = neighborhood_mask((8, 8), 3)
        >>> m.to_dense(64, 64).sum(-1)  # every query sees 3 * 3 keys
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    is_causal: tuple[bool, ...]
    offset: int = 0

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    _coarse_is_exact = True  # blocks are classified exactly from per-axis tables

    @property
    def name(self) -> str:
        """Readable name for tables and plots, e.g. ``neighborhood_13x13_d2x2``."""
        parts = ["neighborhood_" + "x".join(map(str, self.kernel_size))]
        if any(d > 1 for d in self.dilation):
            parts.append("d" + "x".join(map(str, self.dilation)))
        if any(s > 1 for s in self.stride):
            parts.append("s" + "x".join(map(str, self.stride)))
        if any(self.is_causal):
            parts.append("causal" + "".join("1" if c else "0" for c in self.is_causal))
        return "_".join(parts)

    def __repr__(self) -> str:
        off = f", offset={self.offset}" if self.offset else ""
        return (f"neighborhood(shape={self.shape}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"stride={self.stride}, is_causal={self.is_causal}{off})")

    def _axes(self):
        return zip(self.shape, self.kernel_size, self.dilation, self.stride, self.is_causal)

    def mask_mod(self, b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """FlexAttention signature; ``q_idx``/``kv_idx`` index the row-major flattened grid."""
        qc, kc = _unravel(q_idx + self.offset, self.shape), _unravel(kv_idx, self.shape)
        ok = None
        for (n, k, d, s, c), qa, ka in zip(self._axes(), qc, kc):
            a = axis_allowed(qa, ka, n, k, d, s, c)
            ok = a if ok is None else ok & a
        return ok

    def validate(self, nq: int, nk: int) -> None:
        """The pattern lives on one grid: ``nk == prod(shape)`` and query positions ``offset .. offset + nq - 1``
        on it (``nq == nk`` at offset 0)."""
        super().validate(nq, nk)
        self._check_len(nq, nk)

    def _check_len(self, nq: int | None, nk: int | None) -> None:
        keys_ok = nk is None or nk == self.n
        rows_ok = nq is None or (self.offset >= 0 and self.offset + nq <= self.n)
        if not (keys_ok and rows_ok):
            rows = "" if nq is None else f"nq={nq} query rows at flat positions {self.offset}..{self.offset + nq - 1} "
            raise ValueError(f"{rows}(offset={self.offset}) and nk={nk} keys do not fit the grid {self.shape} "
                             f"({self.n} tokens): the keys are the whole grid and the query rows must lie on it")

    def _nq(self, nq: int | None) -> int:
        """Query rows of a call (default: every position from the offset on)."""
        return self.n - self.offset if nq is None else nq

    def _whole(self, nq: int | None) -> bool:
        return self.offset == 0 and self._nq(nq) == self.n

    def axis_dense(self) -> list[torch.Tensor]:
        """Per axis, the ``(n_a, n_a)`` bool pattern; the full mask is their Kronecker (AND) product."""
        out = []
        for n, k, d, s, c in self._axes():
            i = torch.arange(n)
            out.append(axis_allowed(i[:, None], i[None, :], n, k, d, s, c))
        return out

    def to_dense(self, nq: int | None = None, nk: int | None = None, device=None) -> torch.Tensor:
        """The ``(Nq, N)`` bool mask (row = query at flat position row + offset, column = key), N = prod(shape);
        ``Nq`` defaults to ``N - offset``."""
        self._check_len(nq, nk)
        full = torch.ones(1, 1, dtype=torch.bool)
        for m in self.axis_dense():  # Kronecker product of per-axis patterns, row-major
            full = (full[:, None, :, None] & m[None, :, None, :]).reshape(full.shape[0] * m.shape[0], -1)
        full = full[self.offset:self.offset + self._nq(nq)]
        return full if device is None else full.to(device)

    def row_counts(self) -> torch.Tensor:
        """Number of keys each grid position sees as a query, shape ``shape`` (product of per-axis counts,
        O(N) memory; independent of the offset)."""
        cnt = torch.ones((), dtype=torch.long)
        for n, k, d, s, c in self._axes():
            _g, _u, _L, start, end = axis_windows(n, k, d, s, c)
            cnt = cnt[..., None] * (end - start)
        return cnt

    def count(self, nq: int | None = None, nk: int | None = None) -> int:
        """Exact number of allowed (query, key) pairs over the call's query rows (for FLOP counts)."""
        self._check_len(nq, nk)
        return int(self.row_counts().flatten()[self.offset:self.offset + self._nq(nq)].sum().item())

    def density(self, nq: int | None = None, nk: int | None = None) -> float:
        """Exact fraction of allowed (query, key) pairs."""
        return self.count(nq, nk) / (float(self._nq(nq)) * self.n)

    def pairs(self) -> int:
        """Exact number of allowed (query, key) pairs (for FLOP counts)."""
        return self.count()

    def axis_keys(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per axis, the gather table ``(keys (n_a, k_a), valid (n_a, k_a))``."""
        out = []
        for n, k, d, s, c in self._axes():
            g, _u, _L, start, end = axis_windows(n, k, d, s, c)
            t = start[:, None] + torch.arange(k)  # (n, k) in-group key coords
            valid = t < end[:, None]
            out.append(((g[:, None] + d * t).clamp(max=n - 1), valid))
        return out

    def _coarse_blocks(self, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
        """Exact ``(ceil(Nq/bq), ceil(N/bk))`` int8 tile classes; ``O(Nq * prod(k))`` work, no Nq x N."""
        n = self.n
        nqb, nkb = -(-nq // bq), -(-n // bk)
        counts = torch.zeros(nqb * nkb, dtype=torch.long)
        tables = self.axis_keys()
        for q0 in range(0, nq, bq):  # a query's keys are the Cartesian product of its per-axis keys
            qi = torch.arange(q0, min(q0 + bq, nq)) + self.offset          # flat grid positions of the rows
            keys = torch.zeros(len(qi), 1, dtype=torch.long)
            valid = torch.ones(len(qi), 1, dtype=torch.bool)
            for na, (kt, vt), ca in zip(self.shape, tables, _unravel(qi, self.shape)):
                keys = (keys[:, :, None] * na + kt[ca][:, None, :]).reshape(len(qi), -1)
                valid = (valid[:, :, None] & vt[ca][:, None, :]).reshape(len(qi), -1)
            counts += torch.bincount((q0 // bq) * nkb + keys[valid] // bk, minlength=nqb * nkb)
        counts = counts.view(nqb, nkb)
        rows = torch.full((nqb,), bq)
        rows[-1] = nq - (nqb - 1) * bq
        cols = torch.full((nkb,), bk)
        cols[-1] = n - (nkb - 1) * bk
        out = torch.full((nqb, nkb), EMPTY, dtype=torch.int8)
        out[counts > 0] = PARTIAL
        out[counts == rows[:, None] * cols[None, :]] = FULL
        return out

    def query(self, i: int | tuple[int, ...]) -> torch.Tensor:
        """Bool tensor of shape ``shape``: the keys query ``i`` (flat index or coordinate) sees."""
        if isinstance(i, int):
            if not 0 <= i < self.n:
                raise ValueError(f"query index {i} out of range for grid {self.shape}")
            coords = [int(c) for c in _unravel(torch.tensor(i), self.shape)]
        else:
            coords = list(i)
            if len(coords) != len(self.shape) or any(not 0 <= c < n for c, n in zip(coords, self.shape)):
                raise ValueError(f"query coordinate {i} out of range for grid {self.shape}")
        out = torch.ones((), dtype=torch.bool)
        for (n, k, d, s, c), qc in zip(self._axes(), coords):  # one row per axis, never n x n
            out = out[..., None] & axis_allowed(torch.tensor(qc), torch.arange(n), n, k, d, s, c)
        return out

    def picture(self, i: int | tuple[int, ...]) -> str:
        """Text picture of one query's neighbourhood: ``Q`` the query, ``#`` a key it sees, ``.`` not.

        1-D: one line; 2-D: rows are the first axis; 3-D: one block per slice of the first axis.
        """
        m = self.query(i)
        coords = tuple(int(c) for c in _unravel(torch.tensor(i), self.shape)) if isinstance(i, int) else tuple(i)

        def grid2(sl: torch.Tensor, qc: tuple[int, ...] | None) -> list[str]:
            lines = []
            for y in range(sl.shape[0]):
                chars = ["#" if sl[y, x] else "." for x in range(sl.shape[1])]
                if qc is not None and qc[0] == y:
                    chars[qc[1]] = "Q"
                lines.append("".join(chars))
            return lines

        head = f"{self!r}, query {coords}"
        if m.dim() == 1:
            return head + "\n" + grid2(m[None], (0, coords[0]))[0]
        if m.dim() == 2:
            return "\n".join([head, *grid2(m, coords)])
        out = [head]
        for t in range(m.shape[0]):
            out.append(f"[{t}]")
            out.extend(grid2(m[t], coords[1:] if t == coords[0] else None))
        return "\n".join(out)


def neighborhood_mask(shape: int | tuple[int, ...], kernel_size: object, dilation: object = 1, stride: object = 1,
                      is_causal: object = False, *, offset: int = 0) -> NeighborhoodMask:
    """The neighbourhood pattern on a spatial grid, flattened row-major (NATTEN semantics).

    Args:
        shape: spatial extent, ``N`` or ``(X0, X1[, X2])``.
        kernel_size, dilation, stride, is_causal: an int/bool or one entry per spatial dim.
        offset: query row ``q`` sits at flat grid position ``q + offset`` (``>= 0``); keys are the whole grid.

    Returns:
        A :class:`NeighborhoodMask` with ``mask_mod``, ``to_dense``, ``blocks``, ``density``, ``query``.

    Example:
        >>> print(neighborhood_mask((7, 7), 3, dilation=2).picture((3, 3)))
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    offset = offset_arg(offset, "neighborhood", 0)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"shape must be 1 to 3 positive ints, got {shape}")
    for n in shape:
        int_arg("shape", n, 1)
    ks, ds, ss, cs = check_na_params(shape, kernel_size, dilation, stride, is_causal)
    if offset >= math.prod(shape):
        raise ValueError(f"neighborhood: offset {offset} is past the grid {shape} ({math.prod(shape)} tokens)")
    return NeighborhoodMask(shape, ks, ds, ss, cs, offset)
