"""The tile plan of the blocked backend: which keys each query tile visits, and where to mask.

Built once per (mask, Nq, Nk, tile sizes) from ``mask.blocks`` (never ``Nq x Nk``) and cached;
its build time is the one-off "mask building" cost the benchmark reports apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from attnkit.masks.base import EMPTY, PARTIAL, Mask


@dataclass(frozen=True)
class Chunk:
    """Keys one query tile visits in one matmul.

    ``k0, k1``: a contiguous key range when ``index`` is None; otherwise ``index`` (int64)
    lists the keys (several runs glued together). ``partial`` holds ``(c0, c1, allowed)``:
    local column ranges that need masking, with the tile's bool mask ``(..., bq, c1 - c0)``.
    """

    k0: int
    k1: int
    index: torch.Tensor | None
    partial: tuple[tuple[int, int, torch.Tensor], ...]

    @property
    def width(self) -> int:
        return self.k1 - self.k0 if self.index is None else self.index.numel()


@dataclass(frozen=True)
class Plan:
    bq: int
    rows: tuple[tuple[int, int, tuple[Chunk, ...]], ...]  # (q0, q1, chunks) per non-empty query tile
    empty_rows: tuple[tuple[int, int], ...]  # query tiles that see no key at all
    computed_pairs: int  # query-key pairs the plan computes (useful + masked-out in partial tiles)


def _runs(cols: list[int]) -> list[tuple[int, int]]:
    """Consecutive tile indices grouped into half-open runs."""
    runs: list[tuple[int, int]] = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def build_plan(mask: Mask | None, nq: int, nk: int, bq: int, bk: int, max_keys: int) -> Plan:
    return _build_plan_cached(mask, nq, nk, bq, bk, max_keys)


@lru_cache(maxsize=64)
def _build_plan_cached(mask: Mask | None, nq: int, nk: int, bq: int, bk: int, max_keys: int) -> Plan:
    if mask is None:
        cls = torch.full((-(-nq // bq), -(-nk // bk)), 2, dtype=torch.int8)
    else:
        cls = mask.blocks(nq, nk, bq, bk)
    rows, empty_rows, computed = [], [], 0
    for i, row in enumerate(cls.tolist()):
        q0, q1 = i * bq, min(nq, (i + 1) * bq)
        cols = [j for j, c in enumerate(row) if c != EMPTY]
        if not cols:
            empty_rows.append((q0, q1))
            continue
        # split runs so that no chunk exceeds max_keys (keeps a tile's scores in cache-sized memory)
        pieces: list[tuple[int, int]] = []
        step = max(1, max_keys // bk)
        for a, b in _runs(cols):
            pieces += [(s, min(b, s + step)) for s in range(a, b, step)]
        chunks, group, width = [], [], 0
        for a, b in pieces:
            w = min(nk, b * bk) - a * bk
            if group and width + w > max_keys:
                chunks.append(_chunk(group, row, mask, q0, q1, nq, nk, bk))
                group, width = [], 0
            group.append((a, b))
            width += w
        chunks.append(_chunk(group, row, mask, q0, q1, nq, nk, bk))
        computed += (q1 - q0) * sum(c.width for c in chunks)
        rows.append((q0, q1, tuple(chunks)))
    return Plan(bq=bq, rows=tuple(rows), empty_rows=tuple(empty_rows), computed_pairs=computed)


def _chunk(group, row, mask, q0, q1, nq, nk, bk) -> Chunk:
    ranges = [(a * bk, min(nk, b * bk)) for a, b in group]
    index = None
    if len(ranges) > 1:
        index = torch.cat([torch.arange(s, e) for s, e in ranges])
    partial, offset = [], 0
    for a, b in group:
        for j in range(a, b):
            if row[j] == PARTIAL:
                c0 = offset + (j - a) * bk
                c1 = c0 + min(nk, (j + 1) * bk) - j * bk
                if partial and partial[-1][1] == c0:  # merge neighbouring partial tiles
                    c0 = partial.pop()[0]
                partial.append((c0, c1))
        offset += min(nk, b * bk) - a * bk
    keys = index if index is not None else torch.arange(ranges[0][0], ranges[0][1])
    masked = tuple((c0, c1, mask.tile(q0, q1, keys[c0:c1], nq, nk)) for c0, c1 in partial)
    return Chunk(ranges[0][0], ranges[-1][1], index, masked)
