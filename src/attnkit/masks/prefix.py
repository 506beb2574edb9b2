"""Prefix-LM and global tokens.

Both are absolute in position: the prefix and the global tokens are the first positions of the
sequence. Keys sit at positions ``0..Nk-1`` and query row ``q`` at position ``q + offset``, so a
decoded query (``offset = Nk - Nq``) is a global token only if its position is below ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, interval, offset_arg


def _offset_repr(offset: int) -> str:
    return f", offset={offset}" if offset else ""


@dataclass(frozen=True)
class PrefixLM(IntervalMask):
    """The first ``prefix`` keys are visible to every query; the rest is causal (``kv <= q + offset``)."""

    prefix: int
    offset: int = 0

    def __repr__(self) -> str:
        return f"prefix_lm({self.prefix}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + self.offset) | (kv_idx < self.prefix)

    def intervals(self, nq, nk):
        p = torch.arange(nq) + self.offset
        return interval(torch.zeros_like(p), torch.clamp(p, min=self.prefix - 1))


@dataclass(frozen=True)
class GlobalTokens(IntervalMask):
    """Every query sees the first ``n`` keys, and queries at positions below ``n`` see every key.

    ``sliding_window(g) | global_tokens(g)`` is LongCA-bench's global sliding window.
    """

    n: int
    offset: int = 0

    def __repr__(self) -> str:
        return f"global_tokens({self.n}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.n) | (q_idx + self.offset < self.n)

    def intervals(self, nq, nk):
        p = torch.arange(nq) + self.offset
        return interval(torch.zeros_like(p), torch.where(p < self.n, nk - 1, self.n - 1))


def prefix_lm(prefix: int, *, offset: int = 0) -> PrefixLM:
    """Prefix-LM: bidirectional over the first ``prefix`` positions, causal after; query row ``q``
    is at position ``q + offset``."""
    return PrefixLM(int_arg("prefix_lm: prefix", prefix, 0), offset_arg(offset, "prefix_lm"))


def global_tokens(n: int, *, offset: int = 0) -> GlobalTokens:
    """``n`` global tokens at the start (BigBird/Longformer-style), seen by and seeing everyone;
    query row ``q`` is at position ``q + offset``."""
    return GlobalTokens(int_arg("global_tokens: n", n, 0), offset_arg(offset, "global_tokens"))
