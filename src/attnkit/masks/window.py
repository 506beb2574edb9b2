"""Sliding windows (Longformer / Mistral local attention) and their dilated form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, Mask, interval, residue_tiles, tile_differences


@dataclass(frozen=True)
class SlidingWindow(IntervalMask):
    """``q - left <= kv <= q + right``."""

    left: int
    right: int

    def __repr__(self) -> str:
        if self.left == self.right:
            return f"sliding_window({self.left})"
        return f"sliding_window({self.left}, {self.right})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        return interval(q - self.left, q + self.right)


def sliding_window(left: int, right: int | None = None) -> SlidingWindow:
    """Keys within ``left`` before and ``right`` after the query (``right`` defaults to ``left``).

    ``sliding_window(w)`` is LongCA-bench's ``|i - j| <= w``; ``causal() & sliding_window(w)``
    (or ``sliding_window(w, 0)``) its causal form ``0 <= i - j <= w``.
    """
    left = int_arg("left", left, 0)
    right = left if right is None else int_arg("right", right, 0)
    return SlidingWindow(left, right)


@dataclass(frozen=True)
class DilatedSlidingWindow(Mask):
    """Every ``dilation``-th key within ``left * dilation`` before and ``right * dilation`` after."""

    left: int
    right: int
    dilation: int

    def __repr__(self) -> str:
        r = "" if self.left == self.right else f", {self.right}"
        return f"dilated_sliding_window({self.left}{r}, dilation={self.dilation})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d <= self.left * self.dilation) & (-d <= self.right * self.dilation) & (d % self.dilation == 0)

    _coarse_is_exact = True

    def _coarse_blocks(self, nq, nk, bq, bk):
        lo, hi = tile_differences(nq, nk, bq, bk)                          # q - kv per tile
        lo = lo.clamp_min(-self.right * self.dilation)
        hi = hi.clamp_max(self.left * self.dilation)
        return residue_tiles(nq, nk, bq, bk, lo, hi, self.dilation)

    def count(self, nq, nk):
        self.validate(nq, nk)
        i, d = torch.arange(nq), self.dilation
        lo = (i - self.left * d).clamp_min(0)
        hi = (i + self.right * d).clamp_max(nk - 1)
        first = lo + (i - lo) % d                                         # first key of i's residue class
        return int(torch.where(first <= hi, (hi - first) // d + 1, 0).sum())


def dilated_sliding_window(left: int, dilation: int, right: int | None = None) -> Mask:
    """Longformer's dilated window: ``left``/``right`` keys each side, ``dilation`` apart."""
    left = int_arg("left", left, 0)
    right = left if right is None else int_arg("right", right, 0)
    dilation = int_arg("dilation", dilation, 1)
    if dilation == 1:
        return SlidingWindow(left, right)
    return DilatedSlidingWindow(left, right, dilation)
