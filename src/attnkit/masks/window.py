"""Sliding windows (Longformer / Mistral local attention) and their dilated form.

Both are relative patterns: they depend on ``position(q) - kv`` only, with ``position(q) = q + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, Mask, interval, offset_arg, residue_tiles, tile_differences


def _offset_repr(offset: int) -> str:
    return f", offset={offset}" if offset else ""


@dataclass(frozen=True)
class SlidingWindow(IntervalMask):
    """``p - left <= kv <= p + right`` where ``p = q + offset`` is the query's position."""

    left: int
    right: int
    offset: int = 0

    def __repr__(self) -> str:
        right = "" if self.left == self.right else f", {self.right}"
        return f"sliding_window({self.left}{right}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        p = q_idx + self.offset
        return (kv_idx >= p - self.left) & (kv_idx <= p + self.right)

    def intervals(self, nq, nk):
        p = torch.arange(nq) + self.offset
        return interval(p - self.left, p + self.right)


def sliding_window(left: int, right: int | None = None, *, offset: int = 0) -> SlidingWindow:
    """Keys within ``left`` before and ``right`` after the query's position (``right`` defaults to ``left``).

    ``sliding_window(w)`` is LongCA-bench's ``|i - j| <= w``; ``causal() & sliding_window(w)``
    (or ``sliding_window(w, 0)``) its causal form ``0 <= i - j <= w``. Query row ``q`` sits at
    position ``q + offset``: decoding the last ``m`` of ``N`` tokens is
    ``causal(N - m) & sliding_window(w, offset=N - m)``.
    """
    left = int_arg("sliding_window: left", left, 0)
    right = left if right is None else int_arg("sliding_window: right", right, 0)
    return SlidingWindow(left, right, offset_arg(offset, "sliding_window"))


@dataclass(frozen=True)
class DilatedSlidingWindow(Mask):
    """Every ``dilation``-th key within ``left * dilation`` before and ``right * dilation`` after the
    query's position ``q + offset``."""

    left: int
    right: int
    dilation: int
    offset: int = 0

    def __repr__(self) -> str:
        r = "" if self.left == self.right else f", {self.right}"
        return f"dilated_sliding_window({self.left}{r}, dilation={self.dilation}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx + self.offset - kv_idx
        return (d <= self.left * self.dilation) & (-d <= self.right * self.dilation) & (d % self.dilation == 0)

    _coarse_is_exact = True

    def _coarse_blocks(self, nq, nk, bq, bk):
        lo, hi = tile_differences(nq, nk, bq, bk)                          # q - kv per tile
        lo = (lo + self.offset).clamp_min(-self.right * self.dilation)       # position - kv
        hi = (hi + self.offset).clamp_max(self.left * self.dilation)
        return residue_tiles(nq, nk, bq, bk, lo, hi, self.dilation)

    def count(self, nq, nk):
        self.validate(nq, nk)
        i, d = torch.arange(nq) + self.offset, self.dilation                 # query positions
        lo = (i - self.left * d).clamp_min(0)
        hi = (i + self.right * d).clamp_max(nk - 1)
        first = lo + (i - lo) % d                                         # first key of i's residue class
        return int(torch.where(first <= hi, (hi - first) // d + 1, 0).sum())


def dilated_sliding_window(left: int, dilation: int, right: int | None = None, *, offset: int = 0) -> Mask:
    """Longformer's dilated window: ``left``/``right`` keys each side of the query's position
    ``q + offset``, ``dilation`` apart."""
    left = int_arg("dilated_sliding_window: left", left, 0)
    right = left if right is None else int_arg("dilated_sliding_window: right", right, 0)
    dilation = int_arg("dilated_sliding_window: dilation", dilation, 1)
    offset = offset_arg(offset, "dilated_sliding_window")
    if dilation == 1:
        return SlidingWindow(left, right, offset)
    return DilatedSlidingWindow(left, right, dilation, offset)
