"""USP: A Unified Sequence Parallelism Approach for Long Context Generative AI, arXiv 2405.07719
(Ulysses x Ring on a 2-D mesh).

P = P_u * P_r ranks. Rank ``R = g * P_u + u`` is member ``u`` of Ulysses group ``g`` (contiguous
ranks, usually inside one node) and member ``g`` of ring group ``u``. An all-to-all inside the
Ulysses group turns the P_u shards of ring block ``g`` into that whole block for ``H/P_u`` heads,
ring attention runs across the ring group over those blocks, and the inverse all-to-all returns
each rank's shard. P_r = 1 is Ulysses, P_u = 1 is Ring.

Sequence layout: the sequence is first split over the ring groups (contiguous or zigzag over P_r,
so causal work is balanced across the ring), then each ring block contiguously over its P_u
members: :func:`usp_shard` / :func:`usp_unshard`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit._validate import int_arg
from attnkit.distributed import _comm, zigzag
from attnkit.distributed.ring import ring_attention
from attnkit.distributed.ulysses import around_heads


def make_usp_groups(pu: int, pr: int):
    """Create the Ulysses and ring groups of a ``P = pu * pr`` world; returns this rank's
    ``(ulysses_group, ring_group)``. Every rank must call it (``new_group`` is collective).

    Example:
        >>> ug, rg = make_usp_groups(2, 2)   # 4 ranks: Ulysses {0,1} {2,3}, ring {0,2} {1,3}
    """
    rank, world = _comm.rank_world()
    int_arg("make_usp_groups: pu", pu, 1)
    int_arg("make_usp_groups: pr", pr, 1)
    if pu * pr != world:
        raise ValueError(f"make_usp_groups: pu*pr = {pu}*{pr} = {pu * pr} must equal the world size {world}")
    uly = ring = None
    for g in range(pr):  # every rank creates every group, in one order
        ranks = list(range(g * pu, (g + 1) * pu))
        grp = dist.new_group(ranks)
        if rank in ranks:
            uly = grp
    for u in range(pu):
        ranks = list(range(u, world, pu))
        grp = dist.new_group(ranks)
        if rank in ranks:
            ring = grp
    return uly, ring


def usp_shard(x: torch.Tensor, rank: int, pu: int, pr: int, layout: str = "contiguous", dim: int = 1):
    """Global rank ``rank``'s part of the full sequence ``x`` for USP with ``(pu, pr)``."""
    g, u = divmod(rank, pu)
    return zigzag.shard(zigzag.shard(x, g, pr, layout, dim), u, pu, "contiguous", dim)


def usp_unshard(shards: list[torch.Tensor], pu: int, pr: int, layout: str = "contiguous", dim: int = 1):
    """Inverse of :func:`usp_shard` over the shards of all ``pu * pr`` ranks in rank order."""
    blocks = [torch.cat(list(shards[g * pu:(g + 1) * pu]), dim=dim) for g in range(pr)]
    return zigzag.unshard(blocks, layout, dim)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  ulysses_group, ring_group, layout: str = "contiguous", scale: float | None = None,
                  return_lse: bool = False):
    """Softmax attention over a sequence sharded on a Ulysses x ring mesh.

    Args:
        q: this rank's queries ``(B, Nq_local, Hq, D)`` (from :func:`usp_shard`); ``Hq % P_u == 0``.
        k: ``(B, Nk_local, Hkv, D)``; KV heads are replicated when ``Hkv % P_u != 0`` (see
            :func:`attnkit.distributed.ulysses.ulysses_attention`).
        v: ``(B, Nk_local, Hkv, Dv)``.
        causal: causal self-attention over global positions.
        ulysses_group, ring_group: this rank's groups from :func:`make_usp_groups`.
        layout: ``"contiguous"`` or ``"zigzag"`` split of the sequence over the ring groups.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the lse ``(B, Nq_local, Hq)``.

    Returns:
        ``out (B, Nq_local, Hq, Dv)`` in the input dtype (and the lse with ``return_lse``).

    Example:
        >>> ug, rg = make_usp_groups(2, 2)
        >>> out = usp_attention(q, k, v, causal=True, ulysses_group=ug, ring_group=rg, layout="zigzag")
    """
    return around_heads("usp_attention", q, k, v, ulysses_group, return_lse,
                        lambda qb, kb, vb: ring_attention(qb, kb, vb, causal=causal, layout=layout, scale=scale,
                                                          group=ring_group, return_lse=return_lse))
