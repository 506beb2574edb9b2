"""Strided patterns (Sparse Transformer, S²-Attention shards)."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.masks._args import int_arg
from attnkit.masks.base import Mask


@dataclass(frozen=True)
class Strided(Mask):
    """Relative: ``(q - kv - offset) % stride == 0``; absolute: ``(kv - offset) % stride == 0``."""

    stride: int
    relative: bool = True
    offset: int = 0

    def __repr__(self) -> str:
        extra = "" if self.relative else ", relative=False"
        extra += f", offset={self.offset}" if self.offset else ""
        return f"strided({self.stride}{extra})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        if self.relative:
            return (q_idx - kv_idx - self.offset) % self.stride == 0
        return (kv_idx - self.offset) % self.stride == 0


def strided(stride: int, *, relative: bool = True, offset: int = 0) -> Strided:
    """Every ``stride``-th key: relative to the query (Sparse Transformer's strided head) or at fixed
    columns ``offset, offset + stride, ...`` (``relative=False``: one shard of S²-Attention)."""
    stride = int_arg("stride", stride, 1)
    offset = int_arg("offset", offset, -(1 << 62))
    return Strided(stride, bool(relative), offset % stride)
