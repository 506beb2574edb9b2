"""Strided patterns (Sparse Transformer, S²-Attention shards)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import Mask, residue_tiles, tile_differences


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

    _coarse_is_exact = True

    def _coarse_blocks(self, nq, nk, bq, bk):
        lo, hi = tile_differences(nq, nk, bq, bk)                          # q - kv per tile
        if not self.relative:
            # columns only: kv - offset a multiple of stride, i.e. offset - kv over the key tile
            lo, hi = tile_differences(1, nk, 1, bk)                        # (1, nkb): range of -kv
            cls = residue_tiles(1, nk, 1, bk, lo + self.offset, hi + self.offset, self.stride)
            return cls.expand(-(-nq // bq), -1).contiguous()
        return residue_tiles(nq, nk, bq, bk, lo - self.offset, hi - self.offset, self.stride)

    def count(self, nq, nk):
        self.validate(nq, nk)
        residue = (torch.arange(nq) - self.offset) % self.stride if self.relative else torch.tensor([self.offset])
        per_row = torch.where(residue < nk, (nk - 1 - residue) // self.stride + 1, 0)
        return int(per_row.sum()) if self.relative else int(per_row) * nq


def strided(stride: int, *, relative: bool = True, offset: int = 0) -> Strided:
    """Every ``stride``-th key: relative to the query (Sparse Transformer's strided head) or at fixed
    columns ``offset, offset + stride, ...`` (``relative=False``: one shard of S²-Attention)."""
    stride = int_arg("stride", stride, 1)
    offset = int_arg("offset", offset, -(1 << 62))
    return Strided(stride, bool(relative), offset % stride)
