"""The mask protocol: one small immutable object per pattern, usable by every backend.

A mask answers four questions without ever materialising ``Nq x Nk`` unless asked to:

* ``mask_mod(b, h, q_idx, kv_idx)`` — FlexAttention's elementwise predicate;
* ``to_dense(nq, nk)`` — the boolean matrix, for the reference path;
* ``blocks(nq, nk, bq, bk)`` — which ``bq x bk`` tiles are EMPTY / PARTIAL / FULL (exact);
* ``count(nq, nk)`` / ``density(nq, nk)`` — the exact number / fraction of allowed pairs.

Query position. Every mask places query row ``i`` of a call at position ``i + offset``
(:attr:`Mask.offset`); keys sit at positions ``0..Nk-1``. ``offset = 0`` is top-left alignment
(SDPA's ``is_causal``, FlexAttention); ``offset = Nk - Nq`` is bottom-right alignment, the last
``Nq`` positions of a sequence decoded against its whole cache (:func:`align_bottom_right`).
``&``, ``|`` and ``~`` carry the offset and refuse children whose offsets disagree.

Most masks of the literature are, per query row, a union of a few disjoint key intervals
(causal, sliding windows, chunks, documents, prefixes, global tokens, and their ``&``/``|``/``~``).
:class:`IntervalMask` answers everything from ``O(Nq)`` interval tables. Other masks
(strided, dilated, block layouts, tensors) start from a cheap conservative classification
and refine only the PARTIAL tiles by evaluating the predicate on those tiles.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch

from attnkit._validate import int_arg

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = 1 << 62  # "no interval": lo = _BIG, hi = -1
_REFINE_CHUNK = 1 << 22  # predicate evaluations per refinement batch


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_sizes(nq: int, nk: int, bq: int | None = None, bk: int | None = None) -> None:
    for name, val in (("nq", nq), ("nk", nk), ("bq", bq), ("bk", bk)):
        if val is None:
            continue
        int_arg(name, val, 1)


def offset_arg(offset: object, where: str, minimum: int | None = None) -> int:
    """``offset`` checked as an int (bools refused), ``>= minimum`` when given; errors name ``where``."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{where}: offset must be an int (query row i sits at position i + offset), "
                        f"got {type(offset).__name__}")
    if minimum is not None and offset < minimum:
        raise ValueError(f"{where}: offset must be >= {minimum} (query positions index the pattern), got {offset}")
    return offset


class Mask:
    """Base class of every mask pattern. Subclasses are frozen dataclasses (hashable, readable repr).

    Subclasses implement :meth:`mask_mod`; they may override :meth:`_coarse_blocks` (a cheap
    conservative tile classification) and :meth:`_evaluate` (the predicate on index tensors).

    Query row ``i`` of a call sits at position ``i + offset`` (keys at ``0..Nk-1``): ``mask_mod``,
    ``to_dense``, ``blocks`` and ``density`` all take row indices and apply the offset. A subclass
    that declares an ``offset`` dataclass field honours it in its predicate; one that does not is
    a mask at offset 0. ``offset = None`` marks a mask written in the call's own (row, column)
    coordinates (a bool tensor): it has no query position and combines with any offset.
    """

    #: query row i sits at position i + offset; None: the mask is in row coordinates (tensor masks)
    offset: int | None = 0

    #: True when the pattern differs across batch elements or heads (tensor masks, routed layouts).
    head_dependent: bool = False
    #: True when :meth:`_coarse_blocks` is already exact (skip refinement).
    _coarse_is_exact: bool = False

    # ---- the predicate -------------------------------------------------------------------
    def mask_mod(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Elementwise predicate with FlexAttention's signature; index tensors broadcast."""
        raise NotImplementedError

    @property
    def lead_shape(self) -> tuple[int, int]:
        """``(B|1, H|1)``: the batch and head extent of a head-dependent mask; ``(1, 1)`` otherwise."""
        return (1, 1)

    def as_mask_mod(self):
        """A plain function ``mask_mod(b, h, q_idx, kv_idx)`` (FlexAttention rejects bound methods),
        named after the mask so tables read well (attention-gym's convention)."""
        def mask_mod(b, h, q_idx, kv_idx):
            return self.mask_mod(b, h, q_idx, kv_idx)

        mask_mod.__name__ = "".join(c if c.isalnum() else "_" for c in repr(self)).strip("_")
        return mask_mod

    def validate(self, nq: int, nk: int) -> None:
        """Raise ``ValueError`` if the pattern cannot apply to ``nq`` queries and ``nk`` keys."""
        _check_sizes(nq, nk)

    def with_offset(self, offset: int) -> Mask:
        """The same pattern with query row ``i`` at position ``i + offset`` (replacing the current offset).

        Combinations set it on every child; tensor masks (row coordinates) return themselves.
        """
        offset = offset_arg(offset, f"{self!r}.with_offset")
        if self.offset is None or offset == self.offset:
            return self
        fields = {f.name for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else set()
        if "offset" not in fields:
            raise TypeError(f"{type(self).__name__} ({self!r}) has no offset field: it cannot place query rows "
                            f"at offset {offset}")
        return dataclasses.replace(self, offset=offset)

    def _evaluate(self, q_idx: torch.Tensor, kv_idx: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        """Predicate on broadcastable in-range index tensors, leading dims () or (B, H) for head masks."""
        zero = torch.zeros((), dtype=torch.long)
        return self.mask_mod(zero, zero, q_idx, kv_idx)

    # ---- what backends use ---------------------------------------------------------------
    def to_dense(self, nq: int, nk: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean ``(Nq, Nk)`` (``(B|1, H|1, Nq, Nk)`` for head-dependent masks); True = attend."""
        self.validate(nq, nk)
        q = torch.arange(nq)[:, None]
        kv = torch.arange(nk)[None, :]
        out = self._evaluate(q, kv, nq, nk)
        out = out.expand(*out.shape[:-2], nq, nk) if out.dim() >= 2 else out.expand(nq, nk)
        return out.contiguous().to(device) if device is not None else out.contiguous()

    def tile(self, q0: int, q1: int, kv_idx: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        """The mask of rows ``q0:q1`` against the key indices ``kv_idx`` (1-D): ``(..., q1 - q0, len(kv_idx))``."""
        return self._evaluate(torch.arange(q0, q1)[:, None], kv_idx[None, :], nq, nk)

    def blocks(self, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
        """Exact tile classes, int8 ``(ceil(Nq/bq), ceil(Nk/bk))``: 0 EMPTY, 1 PARTIAL, 2 FULL.

        Tiles at the edges are clipped to ``Nq``/``Nk``; FULL means every existing pair is allowed.
        """
        _check_sizes(nq, nk, bq, bk)
        return _blocks_cached(self, nq, nk, bq, bk)

    def count(self, nq: int, nk: int) -> int:
        """Exact number of allowed (query, key) pairs (summed over B and H for head masks: per (B, H) mean)."""
        self.validate(nq, nk)
        return _count_cached(self, nq, nk)

    def density(self, nq: int, nk: int) -> float:
        """Exact fraction of allowed pairs."""
        return self.count(nq, nk) / (nq * nk)

    @property
    def name(self) -> str:
        """A short readable name for tables and plots."""
        return repr(self)

    # ---- classification machinery ----------------------------------------------------------
    def _coarse_blocks(self, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
        """Conservative classes: EMPTY/FULL only where certain, PARTIAL otherwise. Override to be cheap."""
        return torch.full((_ceil_div(nq, bq), _ceil_div(nk, bk)), PARTIAL, dtype=torch.int8)

    def _refine(self, cls: torch.Tensor, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
        """Evaluate the PARTIAL tiles and reclassify them exactly; returns ``(classes, allowed_in_partials)``."""
        cls = cls.clone()
        ti, tj = (cls == PARTIAL).nonzero(as_tuple=True)
        per_batch = max(1, _REFINE_CHUNK // (bq * bk))
        dq, dk = torch.arange(bq), torch.arange(bk)
        for s in range(0, ti.numel(), per_batch):
            i, j = ti[s:s + per_batch], tj[s:s + per_batch]
            q = i[:, None] * bq + dq[None]                                   # (P, bq)
            kv = j[:, None] * bk + dk[None]                                  # (P, bk)
            qv, kvv = q < nq, kv < nk
            ok = self._evaluate(q.clamp_max(nq - 1)[:, :, None], kv.clamp_max(nk - 1)[:, None, :], nq, nk)
            valid = qv[:, :, None] & kvv[:, None, :]                         # (P, bq, bk)
            if ok.dim() > 3:  # head-dependent: a tile is FULL/EMPTY only if it is for every (b, h)
                ok, valid = _heads_second(ok), valid[:, None]                 # (P, BH, bq, bk)
            anyv = (ok & valid).flatten(1).any(1)
            allv = (ok | ~valid).flatten(1).all(1)
            cls[i, j] = torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)
        return cls

    def _partial_count(self, cls: torch.Tensor, nq: int, nk: int, bq: int, bk: int) -> int:
        ti, tj = (cls == PARTIAL).nonzero(as_tuple=True)
        total = 0
        per_batch = max(1, _REFINE_CHUNK // (bq * bk))
        dq, dk = torch.arange(bq), torch.arange(bk)
        for s in range(0, ti.numel(), per_batch):
            i, j = ti[s:s + per_batch], tj[s:s + per_batch]
            q = i[:, None] * bq + dq[None]
            kv = j[:, None] * bk + dk[None]
            valid = (q < nq)[:, :, None] & (kv < nk)[:, None, :]
            ok = self._evaluate(q.clamp_max(nq - 1)[:, :, None], kv.clamp_max(nk - 1)[:, None, :], nq, nk)
            if ok.dim() > 3:  # head-dependent: the mean count over (b, h)
                ok = _heads_second(ok)                                        # (P, BH, bq, bk)
                total += (ok & valid[:, None]).sum().item() / ok.shape[1]
            else:
                total += (ok & valid).sum().item()
        return total

    # ---- algebra --------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        from attnkit.masks.combine import And
        return And(self, _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        from attnkit.masks.combine import Or
        return Or(self, _as_mask(other))

    def __invert__(self) -> Mask:
        from attnkit.masks.combine import Not
        return Not(self)


def _heads_second(ok: torch.Tensor) -> torch.Tensor:
    """``(B, H, P, bq, bk)`` -> ``(P, B*H, bq, bk)``."""
    return ok.flatten(0, -4).movedim(0, 1)


def _as_mask(m: object) -> Mask:
    if isinstance(m, Mask):
        return m
    if isinstance(m, torch.Tensor):
        from attnkit.masks.tensor import TensorMask
        return TensorMask(m)
    raise TypeError(f"can only combine a Mask with a Mask or a bool tensor, got {type(m).__name__}")


@lru_cache(maxsize=256)
def _blocks_cached(mask: Mask, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
    mask.validate(nq, nk)
    coarse = mask._coarse_blocks(nq, nk, bq, bk)
    return coarse if mask._coarse_is_exact else mask._refine(coarse, nq, nk, bq, bk)


@lru_cache(maxsize=256)
def _count_cached(mask: Mask, nq: int, nk: int) -> int:
    bq, bk = min(nq, 128), min(nk, 128)
    cls = mask.blocks(nq, nk, bq, bk)
    rows = torch.full((cls.shape[0],), bq, dtype=torch.long)
    rows[-1] = nq - bq * (cls.shape[0] - 1)
    cols = torch.full((cls.shape[1],), bk, dtype=torch.long)
    cols[-1] = nk - bk * (cls.shape[1] - 1)
    full = ((cls == FULL).long() * rows[:, None] * cols[None, :]).sum().item()
    total = full + mask._partial_count(cls, nq, nk, bq, bk)
    # head-dependent masks count the mean over (b, h), which need not be a whole number
    return total if mask.head_dependent else round(total)


class IntervalMask(Mask):
    """A mask whose allowed keys, per query row, are a union of disjoint inclusive intervals.

    Subclasses implement :meth:`intervals`; everything else is derived in ``O(Nq)`` plus the
    few PARTIAL tiles on interval edges.
    """

    #: how many intervals per row :meth:`intervals` returns (R)
    arity: int = 1

    def intervals(self, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, each int64 ``(R, Nq)``: row i allows keys in ``[lo[r, i], hi[r, i]]`` for each r.

        Intervals of one row are disjoint; an empty one has ``lo > hi``. Values may lie outside
        ``[0, Nk)``; they are clipped here.
        """
        raise NotImplementedError

    def clipped_intervals(self, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _intervals_cached(self, nq, nk)

    def _evaluate(self, q_idx: torch.Tensor, kv_idx: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        lo, hi = self.clipped_intervals(nq, nk)
        out = torch.zeros((), dtype=torch.bool)
        for r in range(lo.shape[0]):
            out = out | ((kv_idx >= lo[r][q_idx]) & (kv_idx <= hi[r][q_idx]))
        return out

    def _coarse_blocks(self, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
        lo, hi = self.clipped_intervals(nq, nk)
        nqb, nkb = _ceil_div(nq, bq), _ceil_div(nk, bk)
        pad = nqb * bq - nq
        # replicate the last row into the padding: it changes no min/max
        lo_p = torch.cat([lo, lo[:, -1:].expand(-1, pad)], 1).view(-1, nqb, bq)   # (R, nqb, bq)
        hi_p = torch.cat([hi, hi[:, -1:].expand(-1, pad)], 1).view(-1, nqb, bq)
        k0 = torch.arange(nkb) * bk                                                # (nkb,)
        k1 = torch.clamp(k0 + bk, max=nk) - 1
        full = ((lo_p.amax(-1)[..., None] <= k0) & (hi_p.amin(-1)[..., None] >= k1)).any(0)   # (nqb, nkb)
        miss = ((hi_p.amax(-1)[..., None] < k0) | (lo_p.amin(-1)[..., None] > k1)).all(0)
        return torch.where(full, FULL, torch.where(miss, EMPTY, PARTIAL)).to(torch.int8)

    def _covered(self, ti, tj, nq, nk, bq, bk):
        """Keys each row of tiles ``(ti, tj)`` allows inside the tile: ``(P, bq)``, row validity, tile widths.

        Exact in ``O(bq * R)`` per tile because a row's intervals are disjoint.
        """
        lo, hi = self.clipped_intervals(nq, nk)
        q = ti[:, None] * bq + torch.arange(bq)[None]                    # (P, bq)
        valid = q < nq
        q = q.clamp_max(nq - 1)
        k0 = (tj * bk)[:, None]                                          # (P, 1)
        k1 = torch.clamp(k0 + bk, max=nk) - 1
        cov = (torch.minimum(hi[:, q], k1) - torch.maximum(lo[:, q], k0) + 1).clamp_min(0).sum(0)   # (P, bq)
        return cov, valid, k1 - k0 + 1

    def _refine(self, cls, nq, nk, bq, bk):
        cls = cls.clone()
        ti, tj = (cls == PARTIAL).nonzero(as_tuple=True)
        if ti.numel():
            cov, valid, width = self._covered(ti, tj, nq, nk, bq, bk)
            full = ((cov == width) | ~valid).all(1)
            empty = ((cov == 0) | ~valid).all(1)
            cls[ti, tj] = torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)
        return cls

    def count(self, nq: int, nk: int) -> int:
        self.validate(nq, nk)
        lo, hi = self.clipped_intervals(nq, nk)
        return int((hi - lo + 1).clamp_min(0).sum().item())


@lru_cache(maxsize=256)
def _intervals_cached(mask: IntervalMask, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask.validate(nq, nk)
    lo, hi = mask.intervals(nq, nk)
    lo, hi = lo.clamp(0, nk), hi.clamp(-1, nk - 1)
    empty = lo > hi
    return torch.where(empty, _BIG, lo), torch.where(empty, -1, hi)


def residue_tiles(nq: int, nk: int, bq: int, bk: int, lo: torch.Tensor, hi: torch.Tensor, step: int) -> torch.Tensor:
    """Exact classes of tiles whose allowed pairs are those with ``i - j`` a multiple of ``step``
    inside per-tile bounds ``[lo, hi]`` (``(nqb, nkb)``, already intersected with the tiles' own
    difference ranges). Non-empty iff the range holds a multiple of ``step``; FULL only for
    single-pair tiles (``step > 1`` never allows two neighbouring keys or queries)."""
    has = torch.div(hi, step, rounding_mode="floor") >= -torch.div(-lo, step, rounding_mode="floor")
    has &= lo <= hi
    rows = torch.clamp(torch.arange(_ceil_div(nq, bq)) * bq + bq, max=nq) - torch.arange(_ceil_div(nq, bq)) * bq
    cols = torch.clamp(torch.arange(_ceil_div(nk, bk)) * bk + bk, max=nk) - torch.arange(_ceil_div(nk, bk)) * bk
    single = (rows[:, None] == 1) & (cols[None, :] == 1)
    full = has & (single | (step == 1))
    return torch.where(full, FULL, torch.where(has, PARTIAL, EMPTY)).to(torch.int8)


def tile_differences(nq: int, nk: int, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest ``q - kv`` inside each tile: two ``(nqb, nkb)`` tables."""
    q0 = torch.arange(_ceil_div(nq, bq)) * bq
    k0 = torch.arange(_ceil_div(nk, bk)) * bk
    q1, k1 = torch.clamp(q0 + bq, max=nq) - 1, torch.clamp(k0 + bk, max=nk) - 1
    return q0[:, None] - k1[None, :], q1[:, None] - k0[None, :]


def interval(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one interval per row into the ``(1, Nq)`` tables :meth:`IntervalMask.intervals` returns."""
    return lo[None].long(), hi[None].long()
