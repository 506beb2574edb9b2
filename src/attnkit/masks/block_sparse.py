"""Block-sparse layouts: which (query block, key block) pairs are computed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask, _ceil_div


@dataclass(frozen=True, eq=False)
class BlockSparse(Mask):
    """``layout[..., q // block_q, kv // block_k]``; layout ``(nqb, nkb)`` or ``(B|1, H|1, nqb, nkb)``.

    A 4-D layout that differs across batch or heads is a routed pattern (MoBA, BiFormer);
    ``ak.attention`` runs it with the block-gather engine.
    """

    layout: torch.Tensor
    block_q: int
    block_k: int

    def __repr__(self) -> str:
        bs = self.block_q if self.block_q == self.block_k else (self.block_q, self.block_k)
        dens = self.layout.float().mean().item()
        return f"block_sparse({tuple(self.layout.shape)}, {bs}, density={dens:.2f})"

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        return self.layout.dim() == 4 and (self.layout.shape[0] > 1 or self.layout.shape[1] > 1)

    @property
    def lead_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self.l4.shape[:2])

    @property
    def l4(self) -> torch.Tensor:
        lay = self.layout
        return lay if lay.dim() == 4 else lay[None, None]              # (B|1, H|1, nqb, nkb)

    def validate(self, nq, nk):
        nqb, nkb = self.layout.shape[-2:]
        if nqb != _ceil_div(nq, self.block_q) or nkb != _ceil_div(nk, self.block_k):
            raise ValueError(
                f"block layout {tuple(self.layout.shape)} with blocks ({self.block_q}, {self.block_k}) "
                f"does not cover Nq={nq}, Nk={nk} "
                f"(needs {_ceil_div(nq, self.block_q)} x {_ceil_div(nk, self.block_k)})")

    def mask_mod(self, b, h, q_idx, kv_idx):
        lay = self.l4
        return lay[b % lay.shape[0], h % lay.shape[1], q_idx // self.block_q, kv_idx // self.block_k]

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        qb, kb = q_idx // self.block_q, kv_idx // self.block_k
        return self.l4[:, :, qb, kb] if self.head_dependent else self.l4[0, 0][qb, kb]

    def _coarse_blocks(self, nq, nk, bq, bk):
        if (bq, bk) != (self.block_q, self.block_k):
            return super()._coarse_blocks(nq, nk, bq, bk)
        lay = self.l4.flatten(0, 1).cpu()                               # (BH, nqb, nkb)
        return torch.where(lay.all(0), FULL, torch.where(lay.any(0), PARTIAL, EMPTY)).to(torch.int8)


def block_sparse(layout: torch.Tensor, block_size: int | tuple[int, int]) -> BlockSparse:
    """A block layout as a mask.

    Args:
        layout: bool ``(nqb, nkb)``, or ``(B|1, H|1, nqb, nkb)`` for routed per-(batch, head) layouts.
        block_size: ``b`` or ``(block_q, block_k)`` tokens per block.
    """
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        raise TypeError(f"layout must be a bool tensor, got {getattr(layout, 'dtype', type(layout).__name__)}")
    if layout.dim() not in (2, 4):
        raise ValueError(f"layout must be (nqb, nkb) or (B, H, nqb, nkb), got shape {tuple(layout.shape)}")
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    for v in (bq, bk):
        int_arg("block_size", v, 1)
    return BlockSparse(layout, bq, bk)
