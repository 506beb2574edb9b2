"""The decode-time mask: causal with the queries at the end of a cache, a recent window and attention sinks.

StreamingLLM (Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453 §3.2) keeps
the first ``sinks`` tokens and a window of recent ones. As an :class:`~attnkit.masks.IntervalMask` it
gives every backend of ``ak.attention`` exact tile classes, so split-KV decoding skips the splits a
window leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask


@dataclass(frozen=True)
class DecodeWindow(IntervalMask):
    """Query ``i`` sits at position ``offset + i`` and sees key ``j`` iff ``j <= offset + i`` and
    (``window`` is None, or ``j > offset + i - window``, or ``j < sinks``)."""

    offset: int
    window: int | None = None
    sinks: int = 0
    arity = 2

    def __repr__(self) -> str:
        parts = [f"offset={self.offset}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.sinks:
            parts.append(f"sinks={self.sinks}")
        return f"decode_window({', '.join(parts)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        pos = q_idx + self.offset
        ok = kv_idx <= pos
        if self.window is not None:
            ok = ok & ((kv_idx > pos - self.window) | (kv_idx < self.sinks))
        return ok

    def intervals(self, nq, nk):
        pos = torch.arange(nq) + self.offset
        if self.window is None:
            lo = torch.stack([torch.zeros_like(pos), torch.full_like(pos, 1)])
            hi = torch.stack([pos, torch.zeros_like(pos)])            # second interval empty
            return lo, hi
        recent_lo = torch.maximum(pos - self.window + 1, torch.full_like(pos, self.sinks))
        sink_hi = torch.minimum(torch.full_like(pos, self.sinks - 1), pos)
        return torch.stack([torch.zeros_like(pos), recent_lo]), torch.stack([sink_hi, pos])


def decode_window(offset: int, window: int | None = None, sinks: int = 0) -> DecodeWindow:
    """The decode mask (see :class:`DecodeWindow`); ``window`` counts keys including the query's own."""
    offset = int_arg("offset", offset, -(1 << 62))
    if window is not None:
        window = int_arg("window", window, 1)
    return DecodeWindow(offset, window, int_arg("sinks", sinks, 0))
