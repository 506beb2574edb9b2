"""``&``, ``|`` and ``~`` of masks.

Combinations of interval masks stay interval masks where the algebra allows (intersection
always; complement and union when one side has a single interval per row), so the whole
LongCA-bench zoo keeps ``O(N)`` tile classification. Anything else combines the children's
exact tile classes conservatively and refines the PARTIAL tiles.

A combination carries its children's query offset (``Mask.offset``); children whose offsets
disagree place the same query row at different positions, so combining them raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks.base import EMPTY, FULL, PARTIAL, IntervalMask, Mask


def _arity(m: Mask) -> int | None:
    return m.arity if isinstance(m, IntervalMask) else None


def _common_offset(a: Mask, b: Mask, op: str) -> int | None:
    """The offset ``a op b`` carries; ``ValueError`` naming both masks when they disagree."""
    if a.offset is None:
        return b.offset
    if b.offset is None or a.offset == b.offset:
        return a.offset
    raise ValueError(
        f"cannot combine {a!r} {op} {b!r}: {a!r} has offset {a.offset} but {b!r} has offset {b.offset}, "
        f"so they place query rows at different positions. Give every mask the same offset= "
        f"(query row i sits at position i + offset), or combine them at offset 0 and align the result with "
        f"ak.masks.align_bottom_right(mask, nq, nk) or mask.with_offset(offset)")


class _Binary(Mask):
    a: Mask
    b: Mask
    _op = "&"

    @property
    def offset(self) -> int | None:  # type: ignore[override]
        return self.a.offset if self.a.offset is not None else self.b.offset

    def with_offset(self, offset: int) -> Mask:
        if offset == self.offset:
            return self
        make = And if self._op == "&" else Or
        return make(self.a.with_offset(offset), self.b.with_offset(offset))

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        return self.a.head_dependent or self.b.head_dependent

    @property
    def lead_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(torch.broadcast_shapes(self.a.lead_shape, self.b.lead_shape))

    def validate(self, nq: int, nk: int) -> None:
        self.a.validate(nq, nk)
        self.b.validate(nq, nk)


@dataclass(frozen=True)
class _IntervalAnd(_Binary, IntervalMask):
    a: IntervalMask
    b: IntervalMask

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"

    @property
    def arity(self) -> int:
        return self.a.arity * self.b.arity

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.a.mask_mod(b, h, q_idx, kv_idx) & self.b.mask_mod(b, h, q_idx, kv_idx)

    def intervals(self, nq, nk):
        la, ha = self.a.clipped_intervals(nq, nk)
        lb, hb = self.b.clipped_intervals(nq, nk)
        # pairwise intersections of disjoint families are disjoint
        lo = torch.maximum(la[:, None], lb[None]).flatten(0, 1)    # (Ra*Rb, Nq)
        hi = torch.minimum(ha[:, None], hb[None]).flatten(0, 1)
        return lo, hi


@dataclass(frozen=True)
class _IntervalNot(IntervalMask):
    a: IntervalMask

    def __post_init__(self):
        if self.a.arity != 1:
            raise ValueError("the interval complement needs a single interval per row")

    def __repr__(self) -> str:
        return f"~{self.a!r}"

    arity = 2

    @property
    def offset(self) -> int | None:  # type: ignore[override]
        return self.a.offset

    def with_offset(self, offset: int) -> Mask:
        return self if offset == self.offset else Not(self.a.with_offset(offset))

    def validate(self, nq, nk):
        self.a.validate(nq, nk)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return ~self.a.mask_mod(b, h, q_idx, kv_idx)

    def intervals(self, nq, nk):
        lo, hi = self.a.clipped_intervals(nq, nk)
        lo, hi = lo[0], hi[0]
        empty = lo > hi
        full_lo, full_hi = torch.zeros_like(lo), torch.full_like(hi, nk - 1)
        left_hi = torch.where(empty, full_hi, lo - 1)
        right_lo = torch.where(empty, torch.full_like(lo, nk), hi + 1)
        return torch.stack([full_lo, right_lo]), torch.stack([left_hi, full_hi])


@dataclass(frozen=True)
class _IntervalOr(_Binary, IntervalMask):
    a: IntervalMask  # the side with a single interval per row
    b: IntervalMask
    _op = "|"

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"

    @property
    def arity(self) -> int:
        return 1 + 2 * self.b.arity

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.a.mask_mod(b, h, q_idx, kv_idx) | self.b.mask_mod(b, h, q_idx, kv_idx)

    def intervals(self, nq, nk):
        # a | b == a  ∪  (b & ~a): disjoint by construction
        la, ha = self.a.clipped_intervals(nq, nk)
        rest_lo, rest_hi = _IntervalAnd(self.b, _IntervalNot(self.a)).intervals(nq, nk)
        return torch.cat([la, rest_lo]), torch.cat([ha, rest_hi])


@dataclass(frozen=True)
class _GenericAnd(_Binary):
    a: Mask
    b: Mask

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.a.mask_mod(b, h, q_idx, kv_idx) & self.b.mask_mod(b, h, q_idx, kv_idx)

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        return self.a._evaluate(q_idx, kv_idx, nq, nk) & self.b._evaluate(q_idx, kv_idx, nq, nk)

    def _coarse_blocks(self, nq, nk, bq, bk):
        x, y = self.a.blocks(nq, nk, bq, bk), self.b.blocks(nq, nk, bq, bk)
        out = torch.full_like(x, PARTIAL)
        out[(x == FULL) & (y == FULL)] = FULL
        out[(x == EMPTY) | (y == EMPTY)] = EMPTY
        return out


@dataclass(frozen=True)
class _GenericOr(_Binary):
    a: Mask
    b: Mask
    _op = "|"

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.a.mask_mod(b, h, q_idx, kv_idx) | self.b.mask_mod(b, h, q_idx, kv_idx)

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        return self.a._evaluate(q_idx, kv_idx, nq, nk) | self.b._evaluate(q_idx, kv_idx, nq, nk)

    def _coarse_blocks(self, nq, nk, bq, bk):
        x, y = self.a.blocks(nq, nk, bq, bk), self.b.blocks(nq, nk, bq, bk)
        out = torch.full_like(x, PARTIAL)
        out[(x == EMPTY) & (y == EMPTY)] = EMPTY
        out[(x == FULL) | (y == FULL)] = FULL
        return out


@dataclass(frozen=True)
class _GenericNot(Mask):
    a: Mask

    def __repr__(self) -> str:
        return f"~{self.a!r}"

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        return self.a.head_dependent

    @property
    def lead_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return self.a.lead_shape

    @property
    def offset(self) -> int | None:  # type: ignore[override]
        return self.a.offset

    def with_offset(self, offset: int) -> Mask:
        return self if offset == self.offset else Not(self.a.with_offset(offset))

    def validate(self, nq, nk):
        self.a.validate(nq, nk)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return ~self.a.mask_mod(b, h, q_idx, kv_idx)

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        return ~self.a._evaluate(q_idx, kv_idx, nq, nk)

    def _coarse_blocks(self, nq, nk, bq, bk):
        x = self.a.blocks(nq, nk, bq, bk)  # exact, so its complement is exact
        return torch.where(x == FULL, EMPTY, torch.where(x == EMPTY, FULL, PARTIAL)).to(torch.int8)


def And(a: Mask, b: Mask) -> Mask:
    """``a & b``: pairs both allow. ``ValueError`` when their offsets disagree."""
    _common_offset(a, b, "&")
    if _arity(a) and _arity(b):
        return _IntervalAnd(a, b)
    return _GenericAnd(a, b)


def Or(a: Mask, b: Mask) -> Mask:
    """``a | b``: pairs either allows. ``ValueError`` when their offsets disagree."""
    _common_offset(a, b, "|")
    if _arity(a) == 1 and _arity(b):
        return _IntervalOr(a, b)
    if _arity(b) == 1 and _arity(a):
        return _IntervalOr(b, a)
    return _GenericOr(a, b)


def Not(a: Mask) -> Mask:
    """``~a``: the pairs ``a`` refuses, at ``a``'s offset."""
    if _arity(a) == 1:
        return _IntervalNot(a)
    return _GenericNot(a)
