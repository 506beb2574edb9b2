"""Strided patterns (Sparse Transformer, S²-Attention shards)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import Mask, offset_arg, residue_tiles, tile_differences


@dataclass(frozen=True)
class Strided(Mask):
    """Relative: ``(p - kv - phase) % stride == 0`` with ``p = q + offset`` the query's position;
    absolute: ``(kv - phase) % stride == 0`` (fixed key columns: the same for every query, so the
    offset does not change it)."""

    stride: int
    relative: bool = True
    phase: int = 0
    offset: int = 0

    def __repr__(self) -> str:
        extra = "" if self.relative else ", relative=False"
        extra += f", phase={self.phase}" if self.phase else ""
        extra += f", offset={self.offset}" if self.offset else ""
        return f"strided({self.stride}{extra})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        if self.relative:
            return (q_idx + self.offset - kv_idx - self.phase) % self.stride == 0
        return (kv_idx - self.phase) % self.stride == 0

    _coarse_is_exact = True

    def _coarse_blocks(self, nq, nk, bq, bk):
        if not self.relative:
            # columns only: kv - phase a multiple of stride, i.e. phase - kv over the key tile
            lo, hi = tile_differences(1, nk, 1, bk)                        # (1, nkb): range of -kv
            cls = residue_tiles(1, nk, 1, bk, lo + self.phase, hi + self.phase, self.stride)
            return cls.expand(-(-nq // bq), -1).contiguous()
        lo, hi = tile_differences(nq, nk, bq, bk)                          # q - kv per tile
        shift = self.offset - self.phase
        return residue_tiles(nq, nk, bq, bk, lo + shift, hi + shift, self.stride)

    def count(self, nq, nk):
        self.validate(nq, nk)
        if self.relative:
            residue = (torch.arange(nq) + self.offset - self.phase) % self.stride   # first key of each row
        else:
            residue = torch.tensor([self.phase])
        per_row = torch.where(residue < nk, (nk - 1 - residue) // self.stride + 1, 0)
        return int(per_row.sum()) if self.relative else int(per_row) * nq


def strided(stride: int, *, relative: bool = True, phase: int = 0, offset: int = 0) -> Strided:
    """Every ``stride``-th key: relative to the query's position ``q + offset`` (Sparse Transformer's
    strided head: keys ``p - phase, p - phase - stride, ...`` and beyond), or at fixed columns
    ``phase, phase + stride, ...`` (``relative=False``: one shard of S²-Attention; the same for every
    query, whatever the offset)."""
    stride = int_arg("strided: stride", stride, 1)
    phase = int_arg("strided: phase", phase, -(1 << 62))
    return Strided(stride, bool(relative), phase % stride, offset_arg(offset, "strided"))
