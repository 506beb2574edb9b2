"""Prefix-LM and global tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, interval


@dataclass(frozen=True)
class PrefixLM(IntervalMask):
    """The first ``prefix`` keys are visible to every query; the rest is causal."""

    prefix: int

    def __repr__(self) -> str:
        return f"prefix_lm({self.prefix})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < self.prefix)

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        return interval(torch.zeros_like(q), torch.clamp(q, min=self.prefix - 1))


@dataclass(frozen=True)
class GlobalTokens(IntervalMask):
    """Every query sees the first ``n`` keys, and the first ``n`` queries see every key.

    ``sliding_window(g) | global_tokens(g)`` is LongCA-bench's global sliding window.
    """

    n: int

    def __repr__(self) -> str:
        return f"global_tokens({self.n})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.n) | (q_idx < self.n)

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        return interval(torch.zeros_like(q), torch.where(q < self.n, nk - 1, self.n - 1))


def prefix_lm(prefix: int) -> PrefixLM:
    """Prefix-LM: bidirectional over the first ``prefix`` tokens, causal after."""
    return PrefixLM(int_arg("prefix", prefix, 0))


def global_tokens(n: int) -> GlobalTokens:
    """``n`` global tokens at the start (BigBird/Longformer-style), seen by and seeing everyone."""
    return GlobalTokens(int_arg("n", n, 0))
