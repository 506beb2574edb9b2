"""Causal masks: a query sees keys at or before its own position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks.base import IntervalMask, interval, offset_arg


@dataclass(frozen=True)
class Causal(IntervalMask):
    """``kv_idx <= q_idx + offset``.

    Alignment is top-left (as SDPA's ``is_causal`` and FlexAttention): with ``Nq != Nk`` query
    ``i`` sees keys ``0..i + offset``. For decoding against a cache (bottom-right alignment)
    pass ``offset = Nk - Nq`` (``align_bottom_right``).
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
    """Causal mask ``kv <= q + offset`` (top-left aligned at ``offset = 0``).

    Query row ``q`` sits at position ``q + offset``, as for every mask; ``causal(offset)`` and
    ``causal(offset=offset)`` are the same. Decoding the last ``m`` of ``N`` tokens against the
    whole cache is ``causal(N - m)``, or ``align_bottom_right(causal(), m, N)``.
    """
    return Causal(offset_arg(offset, "causal"))
