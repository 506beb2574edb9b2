"""Hierarchical Self-Attention: Generalizing Neural Attention Mechanics to Multi-Scale Problems
(arXiv 2509.15448) — attention over a tree of nested signals, by dynamic programming.

A query attends the leaves of its own lowest group exactly; higher up, every sibling subtree ``S`` of one of its
ancestors is one key: mean key ``k_S``, mean value ``v_S`` and score bonus ``log |S|``, so a subtree of ``|S|``
identical keys weighs exactly as its ``|S|`` leaves would (the one-group tree is softmax attention). The
subtree means come bottom-up from the children's sums (the DP), so a query touches ``O(b depth)`` keys for
branching ``b``: ``O(N b depth D)`` instead of ``O(N^2 D)``. The closed form of the paper's entropy-minimising
attention could not be checked; this is the block-mean form behind it (see the registry notes).

Backends: ``gather`` (automatic: the queries of one lowest group share one candidate table, built once from
the tree; DP aggregates; one softmax) and ``reference`` (brute force: every subtree pooled from its leaves,
one query at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_sequence2 import naive_hierarchical_attention, uniform_parents


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """A tree over ``N`` leaves: ``parents[l] (M_l,)`` maps level-``l`` nodes to level ``l + 1`` (the last level
    hangs from an implicit root); ``counts`` the node count of every level (leaves first); ``idx (N, K)`` /
    ``valid (N, K)`` list each leaf's candidate keys in the node table ``[leaves, level-1 nodes, ...]``;
    ``log_size (T,)`` the ``log |S|`` of every node."""

    parents: tuple[torch.Tensor, ...]
    counts: tuple[int, ...]
    idx: torch.Tensor
    valid: torch.Tensor
    log_size: torch.Tensor
    members: torch.Tensor  # (G, S): the leaves of each lowest group, padded with 0
    member_ok: torch.Tensor  # (G, S)
    group_idx: torch.Tensor  # (G, K): the candidates shared by every query of a group
    group_ok: torch.Tensor  # (G, K)
    slot: torch.Tensor  # (N,): leaf i's row in the flattened (G S) member table

    @property
    def n(self) -> int:
        return self.counts[0]


def build_hierarchy(parents) -> Hierarchy:
    """Check a parent list (see :class:`Hierarchy`) and build its candidate table."""
    if not isinstance(parents, (list, tuple)) or not parents:
        raise ValueError("hierarchical_attention: parents must be a non-empty list of int tensors")
    ps, counts = [], []
    for level, p in enumerate(parents):
        p = torch.as_tensor(p)
        if p.dim() != 1 or p.numel() == 0 or p.dtype.is_floating_point or bool((p < 0).any()):
            raise ValueError(f"hierarchical_attention: parents[{level}] must be a non-empty 1-D tensor of "
                             f"non-negative ints, got {tuple(p.shape)} {p.dtype}")
        if level and p.numel() != int(ps[-1].max()) + 1:
            raise ValueError(f"hierarchical_attention: parents[{level}] has {p.numel()} entries but level {level} "
                             f"has {int(ps[-1].max()) + 1} nodes")
        ps.append(p.long().cpu())
        counts.append(p.numel())
    counts.append(int(ps[-1].max()) + 1)
    sizes = [torch.ones(counts[0], dtype=torch.float64)]
    for level, p in enumerate(ps):  # leaf counts bottom-up (the DP on sizes)
        sizes.append(torch.zeros(counts[level + 1], dtype=torch.float64).index_add_(0, p, sizes[-1]))
    if any(bool((s == 0).any()) for s in sizes):
        raise ValueError("hierarchical_attention: every node must have at least one child")
    offsets = [0]
    for c in counts[:-1]:
        offsets.append(offsets[-1] + c)
    L = len(ps)
    anc = [torch.arange(counts[0])]  # anc[l][i]: leaf i's level-l ancestor
    for p in ps:
        anc.append(p[anc[-1]])
    cands = []
    for level in range(L + 1):  # level-`level` nodes that are siblings of the query's level-`level` ancestor
        node_parent = ps[level] if level < L else torch.zeros(counts[L], dtype=torch.long)  # (M_level,)
        up = anc[level + 1] if level < L else torch.zeros(counts[0], dtype=torch.long)
        same = node_parent[None, :] == up[:, None]  # (N, M_level)
        if level:
            same &= torch.arange(counts[level])[None, :] != anc[level][:, None]
        cands.append((same, offsets[level]))
    rows = []
    for same, off in cands:
        order = torch.argsort((~same).to(torch.int8), dim=1, stable=True)  # allowed nodes first
        cnt = int(same.sum(1).max())
        take = order[:, :cnt]
        rows.append((take + off, torch.gather(same, 1, take)))
    idx = torch.cat([r[0] for r in rows], 1)
    valid = torch.cat([r[1] for r in rows], 1)
    log_size = torch.cat([s.log() for s in sizes])
    # queries of one lowest group share their candidates (its leaves and the ancestors' siblings): one row each
    G = counts[1]
    first = torch.full((G,), counts[0], dtype=torch.long).scatter_reduce(0, ps[0], torch.arange(counts[0]), "amin")
    grp = ps[0]
    S = int(torch.bincount(grp, minlength=G).max())
    order = torch.argsort(grp, stable=True)  # leaves sorted by group
    rank = torch.empty_like(order)
    rank[order] = torch.arange(counts[0]) - torch.searchsorted(grp[order], grp[order])  # position inside group
    members = torch.zeros(G, S, dtype=torch.long)
    member_ok = torch.zeros(G, S, dtype=torch.bool)
    members[grp, rank] = torch.arange(counts[0])
    member_ok[grp, rank] = True
    return Hierarchy(tuple(ps), tuple(counts), idx, valid, log_size, members, member_ok, idx[first], valid[first],
                     grp * S + rank)


@lru_cache(maxsize=32)
def uniform_hierarchy(n: int, branching: int) -> Hierarchy:
    """The balanced tree (:func:`~attnkit.reference.naive_sequence2.uniform_parents`) with its table, cached."""
    return build_hierarchy(uniform_parents(n, branching))


@dataclass(frozen=True, eq=False)
class HierarchicalCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    tree: Hierarchy
    scale: float

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} {self.q.dtype}, {len(self.tree.parents)} level(s), "
                f"{self.tree.idx.shape[1]} candidate keys per query")


def make_call(q, k, v, tree, *, scale=None) -> HierarchicalCall:
    try:
        check_qkv(q, k, v, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"hierarchical_attention: {e}") from None
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"hierarchical_attention: k must have q's {q.shape[2]} heads, got {k.shape[2]}")
    if not isinstance(tree, Hierarchy):
        tree = build_hierarchy(tree)
    if tree.n != q.shape[1]:
        raise ValueError(f"hierarchical_attention: the tree has {tree.n} leaves but N = {q.shape[1]}")
    return HierarchicalCall(q, k, v, tree, resolve_scale(scale, q.shape[-1]))


def _gather(c: HierarchicalCall) -> torch.Tensor:
    B, N, H, D = c.q.shape
    t, dev = c.tree, c.q.device
    ks, vs, kmeans, vmeans = c.k, c.v, [c.k], [c.v]
    size = torch.ones(N, dtype=c.q.dtype, device=dev)
    for level, p in enumerate(t.parents):  # the DP: subtree sums from the children's sums
        p, m = p.to(dev), t.counts[level + 1]
        ks = ks.new_zeros(B, m, H, D).index_add_(1, p, ks)  # (B, M, H, D)
        vs = vs.new_zeros(B, m, H, vs.shape[-1]).index_add_(1, p, vs)  # (B, M, H, Dv)
        size = size.new_zeros(m).index_add_(0, p, size)
        kmeans.append(ks / size[None, :, None, None])
        vmeans.append(vs / size[None, :, None, None])
    kall = torch.cat(kmeans, 1)  # (B, T, H, D): leaves, then each level's nodes
    vall = torch.cat(vmeans, 1)  # (B, T, H, Dv)
    gidx, gok = t.group_idx.to(dev), t.group_ok.to(dev)  # (G, K)
    G, S = t.members.shape
    bonus = t.log_size.to(device=dev, dtype=c.q.dtype)[gidx].masked_fill(~gok, float("-inf"))  # (G, K)
    qg = (c.q * c.scale)[:, t.members.to(dev)]  # (B, G, S, H, D): padded rows are recomputed and dropped
    s = torch.einsum("bgshd,bgkhd->bghsk", qg, kall[:, gidx]) + bonus[None, :, None, None, :]  # (B, G, H, S, K)
    o = torch.einsum("bghsk,bgkhd->bgshd", torch.softmax(s, -1), vall[:, gidx])  # (B, G, S, H, Dv)
    return o.reshape(B, G * S, H, o.shape[-1])[:, t.slot.to(dev)]  # (B, N, H, Dv)


def _reference(c: HierarchicalCall) -> torch.Tensor:
    return naive_hierarchical_attention(c.q, c.k, c.v, c.tree.parents, scale=c.scale)


DISPATCHER = Dispatcher("hierarchical_attention", [
    Backend("gather", _gather, note="candidate table + DP subtree means, one softmax per query"),
    Backend("reference", _reference, auto=False, note="brute force: every subtree pooled from its leaves"),
])
register_op("hierarchical_attention", make_call, DISPATCHER)


def hierarchical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree, *, scale: float | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """Attention over a tree of the ``N`` tokens: exact inside the lowest group, subtree means above.

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)``.
        tree: a :class:`Hierarchy` (e.g. :func:`uniform_hierarchy`) or a parent list ``[(N,), (M_1,), ...]``.
        scale: score scale (default ``1 / sqrt(D)``).
        backend: None / ``"gather"`` or ``"reference"``.

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 64, 2, 16)
        >>> o = hierarchical_attention(q, k, v, uniform_hierarchy(64, 4))
    """
    return DISPATCHER.run(make_call(q, k, v, tree, scale=scale), backend)


def hierarchical_density(tree: Hierarchy) -> float:
    """Candidate keys per query (mean, plus the DP's one pass) over ``N``: the ideal speedup is its inverse."""
    return (float(tree.valid.sum()) / tree.n + 1) / tree.n


__all__ = ["Hierarchy", "build_hierarchy", "hierarchical_attention", "hierarchical_density",
           "uniform_hierarchy"]
