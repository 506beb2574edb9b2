"""Causal masks: a query sees keys at or before its own position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks.base import IntervalMask, interval


@dataclass(frozen=True)
class Causal(IntervalMask):
    """``kv_idx <= q_idx + offset``.

    Alignment is top-left (as SDPA's ``is_causal`` and FlexAttention): with ``Nq != Nk`` query
    ``i`` sees keys ``0..i + offset``. For decoding against a cache (bottom-right alignment)
    pass ``offset = Nk - Nq``.
    """

    offset: int = 0

    def __repr__(self) -> str:
        return "causal" if self.offset == 0 else f"causal(offset={self.offset})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        return interval(torch.zeros_like(q), q + self.offset)


def causal(offset: int = 0) -> Causal:
    """Causal mask ``kv <= q + offset`` (top-left aligned). ``offset`` shifts the diagonal."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    return Causal(offset)
