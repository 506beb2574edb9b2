"""Cell-local cross-attention: Cambrian-1's Spatial Vision Aggregator (SVA).

"Cambrian-1: A Fully Open, Vision-Centric Exploration of Multimodal LLMs", arXiv 2406.16860, §3.1: an
``L x L`` grid of queries; query ``(i, j)`` attends only to the ``m x m`` cell ``[m i, m (i+1)) x
[m j, m (j+1))`` of each encoder's ``mL x mL`` feature map (``m`` per map), all maps' cells together in
one softmax. Vision Remember (arXiv 2506.03928) re-uses the same local cross-attention between LLM layers.
The fast path reshapes every map into its cells and runs one dense attention per cell, batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_cell_local_attention


@dataclass(frozen=True, eq=False)
class CellCall:
    """A validated ``cell_local_attention`` call."""

    q: torch.Tensor
    feats: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    grid: int
    scale: float

    def describe(self) -> str:
        maps = ", ".join(f"{k.shape[1]}x{k.shape[2]}" for k, _ in self.feats)
        return f"q {tuple(self.q.shape)} {self.q.dtype}, grid {self.grid}x{self.grid}, maps {maps}"


def make_call(q, feats, grid, *, scale=None) -> CellCall:
    grid = int_arg("cell_local_attention: grid", grid, 1)
    feats = tuple(tuple(p) for p in feats)
    if not feats or any(len(p) != 2 for p in feats):
        raise ValueError("cell_local_attention: feats must be a non-empty list of (k, v) pairs")
    for i, (k, v) in enumerate(feats):
        check_qkv(q, k.flatten(1, 2), v.flatten(1, 2)) if k.dim() == 5 else None
        if k.dim() != 5 or k.shape[1] != k.shape[2] or k.shape[1] % grid:
            raise ValueError(f"cell_local_attention: feats[{i}] k must be (B, mL, mL, H, D) with L = grid = {grid}, "
                             f"got {tuple(k.shape)}")
    if q.dim() != 4 or q.shape[1] != grid * grid:
        raise ValueError(f"cell_local_attention: q must be (B, L*L, H, D) with L = {grid}, got {tuple(q.shape)}")
    return CellCall(q, feats, grid, resolve_scale(scale, q.shape[-1]))


def _cells(t: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, mL, mL, H, D)`` -> ``(B * L * L, m * m, H, D)``: cell (i, j) of every map as one short sequence."""
    b, y, _, h, d = t.shape
    m = y // grid
    t = t.reshape(b, grid, m, grid, m, h, d).permute(0, 1, 3, 2, 4, 5, 6)       # (B, L, L, m, m, H, D)
    return t.reshape(b * grid * grid, m * m, h, d)


def _cellwise(c: CellCall) -> torch.Tensor:
    b, n, h, d = c.q.shape
    k = torch.cat([_cells(k, c.grid) for k, _ in c.feats], 1)                     # (B*L*L, sum m^2, Hkv, D)
    v = torch.cat([_cells(v, c.grid) for _, v in c.feats], 1)
    out = attention(c.q.reshape(b * n, 1, h, d), k, v, scale=c.scale)             # (B*L*L, 1, H, Dv)
    return out.reshape(b, n, h, -1)


def _reference(c: CellCall) -> torch.Tensor:
    return naive_cell_local_attention(c.q, list(c.feats), c.grid, c.scale)


DISPATCHER = Dispatcher("cell_local_attention", [
    Backend("cellwise", _cellwise, suits=lambda c: (True, "one query per cell, batched"),
            note="maps reshaped into cells, one dense attention per query over its cells"),
    Backend("reference", _reference, auto=False, note="naive_cell_local_attention: the dense cell mask materialised"),
])
register_op("cell_local_attention", make_call, DISPATCHER)


def cell_local_attention(q, feats, grid: int, *, scale: float | None = None, backend: str | None = None):
    """Cambrian-1's spatial vision aggregation: each grid query attends only to its cell of every map.

    Args:
        q: ``(B, L*L, H, D)``, the ``L x L`` grid of queries in raster order.
        feats: a list of ``(k, v)`` pairs, one per encoder, each ``(B, m_e L, m_e L, Hkv, D)`` / ``(..., Dv)``
            heads-last; ``m_e`` may differ between encoders.
        grid: ``L``. scale: default ``D ** -0.5``. backend: None, ``"cellwise"`` or ``"reference"``.

    Returns:
        ``(B, L*L, H, Dv)``.

    Example:
        >>> out = cell_local_attention(q, [(k_siglip, v_siglip), (k_dino, v_dino)], grid=24)
    """
    return DISPATCHER.run(make_call(q, feats, grid, scale=scale), backend)
