"""Fixed-size blocks: block-diagonal (chunked) and block-causal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, interval


@dataclass(frozen=True)
class Chunked(IntervalMask):
    """``q // block == kv // block``: attention within fixed-size chunks (block-diagonal)."""

    block: int

    def __repr__(self) -> str:
        return f"chunked({self.block})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx // self.block == kv_idx // self.block

    def intervals(self, nq, nk):
        start = torch.arange(nq) // self.block * self.block
        return interval(start, start + self.block - 1)


@dataclass(frozen=True)
class BlockCausal(IntervalMask):
    """``kv // block <= q // block``: each block sees itself and every earlier block."""

    block: int

    def __repr__(self) -> str:
        return f"block_causal({self.block})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx // self.block <= q_idx // self.block

    def intervals(self, nq, nk):
        end = (torch.arange(nq) // self.block + 1) * self.block - 1
        return interval(torch.zeros_like(end), end)


def chunked(block: int) -> Chunked:
    """Block-diagonal attention within chunks of ``block`` tokens."""
    return Chunked(int_arg("block", block, 1))


def block_causal(block: int) -> BlockCausal:
    """Causal at block granularity: block i sees blocks 0..i in full."""
    return BlockCausal(int_arg("block", block, 1))
