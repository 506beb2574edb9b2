"""The tile plan of the blocked backend: which keys each query tile visits, and where to mask.

Built once per (mask, Nq, Nk, tile sizes) from ``mask.blocks`` (never ``Nq x Nk``) and cached;
its build time is the one-off "mask building" cost the benchmark reports apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from attnkit.masks.base import EMPTY, PARTIAL, Mask


@dataclass(frozen=True, eq=False)
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


@dataclass(frozen=True, eq=False)
class Group:
    """``R`` consecutive full-height query tiles, each with one chunk, run as one batched matmul.

    ``index (R, W)``: the keys of each tile, padded to the widest with key ``Nk - 1``;
    ``allowed (R, bq, W)``: the tiles' masks with padding False, or None when all True;
    ``bias (R, 1, bq, W)``: the same as an additive float32 mask for fused kernels, with rows
    that allow no key left at 0 (kernels need a finite row) and listed in ``empty (R, bq)``.
    Built once with the plan, so the timed calls do no mask work.
    """

    q0: int
    tiles: int
    index: torch.Tensor
    allowed: torch.Tensor | None
    rows: int  # query rows per tile (bq, or fewer for the last tile)
    bias: torch.Tensor | None = None
    empty: torch.Tensor | None = None
    # set when tile r's keys are exactly start + r * rows + arange(W): kernels can then read K/V
    # through a strided view instead of gathering a copy (interior sliding-window tiles)
    start: int | None = None


@dataclass(frozen=True, eq=False)
class Plan:
    bq: int
    rows: tuple[tuple[int, int, tuple[Chunk, ...]], ...]  # (q0, q1, chunks) per non-empty query tile
    empty_rows: tuple[tuple[int, int], ...]  # query tiles that see no key at all
    computed_pairs: int  # query-key pairs the plan computes (useful + masked-out in partial tiles)
    groups: tuple[Group, ...] = ()  # single-chunk tiles, batched; ``rows`` then holds the multi-chunk ones


def _runs(cols: list[int]) -> list[tuple[int, int]]:
    """Consecutive tile indices grouped into half-open runs."""
    runs: list[tuple[int, int]] = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def build_plan(mask: Mask | None, nq: int, nk: int, bq: int, bk: int, max_keys: int,
               group_elements: int = 0) -> Plan:
    """The tile plan; with ``group_elements > 0``, consecutive single-chunk tiles are batched into
    groups of at most that many score entries per (batch, head) (``R * bq * W``)."""
    plan = _build_plan_cached(mask, nq, nk, bq, bk, max_keys)
    if group_elements <= 0 or (mask is not None and mask.head_dependent):
        return plan
    return _group_cached(plan, nk, group_elements)


# padded columns a group may add, as a fraction of its computed columns
_MAX_PAD = 0.125


@lru_cache(maxsize=64)
def _group_cached(plan: Plan, nk: int, group_elements: int) -> Plan:
    bq = plan.bq
    groups, rest, run = [], [], []

    def flush():
        if run:
            groups.append(_group(run, run[0][1] - run[0][0], nk))
        run.clear()

    for row in plan.rows:
        q0, q1, chunks = row
        if len(chunks) != 1:
            flush()
            rest.append(row)
            continue
        if q1 - q0 != bq:  # the short last tile is a group of its own
            flush()
            run.append(row)
            flush()
            continue
        if run:
            widths = [r[2][0].width for r in run] + [chunks[0].width]
            wmax = max(widths)
            padded = wmax * len(widths)
            if (run[-1][0] + bq != q0 or padded * bq > group_elements
                    or padded - sum(widths) > _MAX_PAD * padded):
                flush()
        run.append(row)
    flush()
    return Plan(bq=bq, rows=tuple(rest), empty_rows=plan.empty_rows, computed_pairs=plan.computed_pairs,
                groups=tuple(groups))


def _group(run, bq: int, nk: int) -> Group:
    chunks = [r[2][0] for r in run]
    width = max(c.width for c in chunks)
    index = torch.full((len(run), width), nk - 1, dtype=torch.long)
    allowed = torch.ones(len(run), bq, width, dtype=torch.bool)
    needs_mask = False
    for i, c in enumerate(chunks):
        index[i, :c.width] = c.index if c.index is not None else torch.arange(c.k0, c.k1)
        if c.width < width:
            allowed[i, :, c.width:] = False
            needs_mask = True
        for c0, c1, a in c.partial:
            allowed[i, :, c0:c1] = a
            needs_mask = True
    starts = [c.k0 for c in chunks]
    uniform = (all(c.index is None and c.width == width for c in chunks)
               and all(s - starts[0] == i * bq for i, s in enumerate(starts)))
    start = starts[0] if uniform else None
    if not needs_mask:
        return Group(run[0][0], len(run), index, None, bq, start=start)
    empty = ~allowed.any(-1)                                                 # (R, bq)
    bias = torch.zeros(allowed.shape).masked_fill_(~(allowed | empty[..., None]), float("-inf"))
    return Group(run[0][0], len(run), index, allowed, bq, bias[:, None], empty if bool(empty.any()) else None,
                 start)


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
