"""Fixed-size blocks: block-diagonal (chunked) and block-causal.

Blocks are absolute: block ``j`` holds positions ``j * block .. (j + 1) * block - 1``, and a query
row ``q`` belongs to the block of its position ``q + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, interval, offset_arg


def _offset_repr(offset: int) -> str:
    return f", offset={offset}" if offset else ""


@dataclass(frozen=True)
class Chunked(IntervalMask):
    """``(q + offset) // block == kv // block``: attention within fixed-size chunks (block-diagonal)."""

    block: int
    offset: int = 0

    def __repr__(self) -> str:
        return f"chunked({self.block}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx + self.offset) // self.block == kv_idx // self.block

    def intervals(self, nq, nk):
        start = (torch.arange(nq) + self.offset) // self.block * self.block
        return interval(start, start + self.block - 1)


@dataclass(frozen=True)
class BlockCausal(IntervalMask):
    """``kv // block <= (q + offset) // block``: each block sees itself and every earlier block."""

    block: int
    offset: int = 0

    def __repr__(self) -> str:
        return f"block_causal({self.block}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx // self.block <= (q_idx + self.offset) // self.block

    def intervals(self, nq, nk):
        end = ((torch.arange(nq) + self.offset) // self.block + 1) * self.block - 1
        return interval(torch.zeros_like(end), end)


def chunked(block: int, *, offset: int = 0) -> Chunked:
    """Block-diagonal attention within chunks of ``block`` tokens; query row ``q`` is at position ``q + offset``."""
    return Chunked(int_arg("chunked: block", block, 1), offset_arg(offset, "chunked"))


def block_causal(block: int, *, offset: int = 0) -> BlockCausal:
    """Causal at block granularity: block i sees blocks 0..i in full; query row ``q`` is at position ``q + offset``."""
    return BlockCausal(int_arg("block_causal: block", block, 1), offset_arg(offset, "block_causal"))
