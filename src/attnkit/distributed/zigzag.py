"""Sequence layouts for context parallelism: contiguous chunks and the zigzag (load-balanced) order.

Ring Attention, arXiv 2310.01889; zigzag balancing as benchmarked in "Long-Context Attention
Benchmark", arXiv 2510.17896.

``contiguous``: rank r holds tokens ``[r*n, (r+1)*n)`` of ``N = P*n``. Under a causal mask rank r
attends r+1 blocks, so the last rank does P times the work of rank 0.

``zigzag``: the sequence is cut into 2P equal chunks ``c_0 .. c_{2P-1}``; rank r holds ``c_r`` and
``c_{2P-1-r}`` concatenated (local positions still increase). Every rank then evaluates
``(2P-1)*c**2 + c*(c+1)`` allowed causal pairs, ``c`` the chunk length.

Example:
    >>> x = torch.randn(1, 16, 2, 8)                              # (B, N, H, D)
    >>> parts = [shard(x, r, 4, "zigzag") for r in range(4)]      # each (1, 4, 2, 8)
    >>> torch.equal(unshard(parts, "zigzag"), x)
    True
"""

from __future__ import annotations

import torch

from attnkit._validate import int_arg

LAYOUTS = ("contiguous", "zigzag")


def _check(layout: str, world: int, rank: int | None = None) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    int_arg("world", world, 1)
    if rank is not None and not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank!r}")


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's part of the full sequence ``x`` along ``dim``.

    Args:
        x: any tensor, e.g. ``(B, N, H, D)`` with the sequence at ``dim=1``.
        rank, world: this rank and the number of ranks P.
        layout: ``"contiguous"`` (``N % P == 0``) or ``"zigzag"`` (``N % (2P) == 0``).
        dim: the sequence dimension.

    Returns:
        ``(B, N/P, H, D)`` for the default ``dim``; a view for ``contiguous``, a copy for ``zigzag``.
    """
    _check(layout, world, rank)
    n = x.shape[dim]
    parts = world if layout == "contiguous" else 2 * world
    if n % parts:
        raise ValueError(f"shard: sequence length {n} (dim {dim}) does not split into {parts} equal chunks "
                         f"({layout} layout over {world} ranks)")
    chunks = x.chunk(parts, dim=dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def unshard(shards: list[torch.Tensor] | tuple[torch.Tensor, ...], layout: str = "contiguous",
            dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full sequence from every rank's shard, in rank order."""
    world = len(shards)
    _check(layout, world)
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    halves = [s.chunk(2, dim=dim) for s in shards]
    order = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
    return torch.cat(order, dim=dim)


def positions(n_local: int, rank: int, world: int, layout: str = "contiguous") -> torch.Tensor:
    """Global token index of each of this rank's ``n_local`` tokens, ``(n_local,)`` int64."""
    _check(layout, world, rank)
    if layout == "contiguous":
        return torch.arange(rank * n_local, (rank + 1) * n_local)
    if n_local % 2:
        raise ValueError(f"positions: zigzag needs an even local length, got n_local={n_local}")
    c = n_local // 2
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])


def causal_pairs(n_local: int, rank: int, world: int, layout: str = "contiguous") -> int:
    """Allowed (query, key) pairs of a causal self-attention that this rank's queries evaluate."""
    pos = positions(n_local, rank, world, layout)
    return int((pos + 1).sum())  # query at global position i sees keys 0..i
