"""Block-sparse layouts: which (query block, key block) pairs are computed.

A layout is absolute in position: its row ``i`` covers query positions ``i * block_q ..
(i + 1) * block_q - 1`` and query row ``q`` of a call reads row ``(q + offset) // block_q``. A layout
built for a whole sequence of ``N`` tokens therefore also serves its last ``m`` queries decoded
against the whole cache, with ``offset = N - m`` (its rows must cover positions up to
``offset + Nq - 1``: ``nqb == ceil((offset + Nq) / block_q)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask, _ceil_div, offset_arg


@dataclass(frozen=True, eq=False)
class _Layout(Mask):
    """``layout[..., (q + offset) // block_q, kv // block_k]``; layout ``(nqb, nkb)`` or ``(B|1, H|1, nqb, nkb)``."""

    layout: torch.Tensor
    block_q: int
    block_k: int
    offset: int = 0

    def __repr__(self) -> str:
        bs = self.block_q if self.block_q == self.block_k else (self.block_q, self.block_k)
        dens = self.layout.float().mean().item()
        off = f", offset={self.offset}" if self.offset else ""
        return f"block_sparse({tuple(self.layout.shape)}, {bs}, density={dens:.2f}{off})"

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        return self.layout.dim() == 4 and (self.layout.shape[0] > 1 or self.layout.shape[1] > 1)

    @property
    def lead_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self._l4_all.shape[:2])

    @property
    def _l4_all(self) -> torch.Tensor:
        """Every row of the layout, 4-D: ``(B|1, H|1, nqb, nkb)``."""
        lay = self.layout
        return lay if lay.dim() == 4 else lay[None, None]

    def validate(self, nq, nk):
        super().validate(nq, nk)
        nqb, nkb = self.layout.shape[-2:]
        need_q = _ceil_div(self.offset + nq, self.block_q)
        if self.offset < 0 or nqb != need_q or nkb != _ceil_div(nk, self.block_k):
            raise ValueError(
                f"block layout {tuple(self.layout.shape)} with blocks ({self.block_q}, {self.block_k}) "
                f"does not cover Nq={nq} query rows at positions {self.offset}..{self.offset + nq - 1} "
                f"(offset={self.offset}) and Nk={nk} keys "
                f"(needs {need_q} x {_ceil_div(nk, self.block_k)})")

    def with_offset(self, offset: int) -> Mask:
        if offset == self.offset:
            return self
        return block_sparse(self.layout, (self.block_q, self.block_k), offset=offset)

    def mask_mod(self, b, h, q_idx, kv_idx):
        lay = self._l4_all
        return lay[b % lay.shape[0], h % lay.shape[1], (q_idx + self.offset) // self.block_q, kv_idx // self.block_k]

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        qb, kb = (q_idx + self.offset) // self.block_q, kv_idx // self.block_k
        return self._l4_all[:, :, qb, kb] if self.head_dependent else self._l4_all[0, 0][qb, kb]

    # Every (query, key) pair of a call tile maps into the layout rectangle of the rows its query
    # positions touch and the columns its keys touch, and every cell of that rectangle is hit, so a
    # tile is FULL (EMPTY) exactly when the rectangle is all True (all False) for every (b, h).
    _coarse_is_exact = True

    def _coarse_blocks(self, nq, nk, bq, bk):
        lay = self._l4_all.flatten(0, 1).to("cpu", torch.long)                  # (BH, nqb, nkb)
        ps = torch.nn.functional.pad(lay.cumsum(1).cumsum(2), (1, 0, 1, 0))     # (BH, nqb + 1, nkb + 1)
        first = torch.arange(_ceil_div(nq, bq)) * bq                           # first row of each call tile
        last = torch.clamp(first + bq, max=nq) - 1
        r0 = ((first + self.offset) // self.block_q)[:, None]                  # layout rows [r0, r1)
        r1 = ((last + self.offset) // self.block_q + 1)[:, None]
        k0 = torch.arange(_ceil_div(nk, bk)) * bk
        k1 = torch.clamp(k0 + bk, max=nk) - 1
        c0, c1 = (k0 // self.block_k)[None], (k1 // self.block_k + 1)[None]   # layout columns [c0, c1)
        ones = ps[:, r1, c1] - ps[:, r0, c1] - ps[:, r1, c0] + ps[:, r0, c0]  # (BH, nqt, nkt)
        full = (ones == (r1 - r0) * (c1 - c0)).all(0)
        empty = (ones == 0).all(0)
        return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)

    def count(self, nq, nk):
        """Exact allowed pairs from the layout (per (B, H) mean for head-dependent layouts)."""
        self.validate(nq, nk)
        nqb, nkb = self.layout.shape[-2:]
        r = torch.arange(nqb) * self.block_q
        rows = (torch.clamp(r + self.block_q, max=self.offset + nq) - torch.clamp(r, min=self.offset)).clamp_min(0)
        c = torch.arange(nkb) * self.block_k
        cols = torch.clamp(c + self.block_k, max=nk) - c                      # call rows/keys in each cell
        lay = self._l4_all.flatten(0, 1).to("cpu", torch.long)                  # (BH, nqb, nkb)
        total = int((lay * rows[:, None] * cols[None]).sum())
        return total if lay.shape[0] == 1 else total / lay.shape[0]


@dataclass(frozen=True, eq=False)
class BlockSparse(_Layout):
    """A layout whose rows line up with the call's query blocks (``offset % block_q == 0``).

    A 4-D layout that differs across batch or heads is a routed pattern (MoBA, BiFormer);
    ``ak.attention`` runs it with the block-gather engine, which reads :attr:`l4`.
    """

    def __post_init__(self):
        if self.offset % self.block_q:
            raise ValueError(f"BlockSparse needs offset % block_q == 0, got offset={self.offset}, "
                             f"block_q={self.block_q}; use block_sparse(...)")

    @property
    def l4(self) -> torch.Tensor:
        """The rows of the call's query blocks, 4-D: ``(B|1, H|1, nqb_call, nkb)``; block ``i`` of the
        call is layout row ``i + offset // block_q``."""
        return self._l4_all[:, :, self.offset // self.block_q:]


@dataclass(frozen=True, eq=False)
class UnalignedBlockSparse(_Layout):
    """A layout read at an offset that is not a multiple of ``block_q``: each tile of the call straddles
    two layout rows, so the block-gather engine (one layout row per query block) does not take it;
    the tile walk (``blocked``), ``sdpa`` and ``reference`` backends run it from ``blocks``/``to_dense``."""


def block_sparse(layout: torch.Tensor, block_size: int | tuple[int, int], *, offset: int = 0) -> _Layout:
    """A block layout as a mask.

    Args:
        layout: bool ``(nqb, nkb)``, or ``(B|1, H|1, nqb, nkb)`` for routed per-(batch, head) layouts.
            Row ``i`` covers query positions ``i * block_q .. (i + 1) * block_q - 1``.
        block_size: ``b`` or ``(block_q, block_k)`` tokens per block.
        offset: query row ``q`` sits at position ``q + offset`` (``>= 0``), so it reads layout row
            ``(q + offset) // block_q``.
    """
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        raise TypeError(f"block_sparse: layout must be a bool tensor, "
                        f"got {getattr(layout, 'dtype', type(layout).__name__)}")
    if layout.dim() not in (2, 4):
        raise ValueError(f"block_sparse: layout must be (nqb, nkb) or (B, H, nqb, nkb), "
                         f"got shape {tuple(layout.shape)}")
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    for v in (bq, bk):
        int_arg("block_sparse: block_size", v, 1)
    offset = offset_arg(offset, "block_sparse", 0)
    cls = BlockSparse if offset % bq == 0 else UnalignedBlockSparse
    return cls(layout, bq, bk, offset)
