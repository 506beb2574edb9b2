"""Efficient Long-context Language Model Training by Core Attention Disaggregation (arXiv 2510.18121) — CAD.

Core attention (``softmax(Q K^T) V`` of packed documents, causal inside each document) costs
``~ sum_i (i + 1)`` per document, quadratic in its length, while everything else in a layer is linear in
tokens: equal-token shards give unequal attention work. CAD cuts the core attention into tasks
``(document, query range [a, b))`` that need the document's keys ``[0, b)`` and schedules them on ranks so
that attention FLOPs are balanced (section 3 of the paper).

* :func:`plan_cad` — the planner: documents cut into query blocks of at most ``block`` tokens, tasks placed
  longest first on the least loaded rank (LPT). The paper's own heuristic also weighs bytes moved; its exact
  rule is not public, so this is the FLOP-balancing core of it.
* :func:`contiguous_plan` — the baseline: each rank computes the queries of its own contiguous token shard.
* :func:`simulate` — per-rank attention FLOPs (forward, ``4 H D`` per (query, key) pair) and the query/key
  tokens each rank needs from other ranks' shards.
* :func:`cad_attention` — the execution on a process group: each rank holds its contiguous shard
  ``(B, N / P, H, D)`` of the packed sequence, runs its planned tasks with ``ak.attention`` and gets back its
  own rows; differentiable. The transport is deliberately simple (all-gather of q, k, v, reduce-scatter of
  the outputs) rather than the paper's per-task sends; :func:`simulate` counts what per-task sends would move.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from attnkit.distributed._comm import all_gather_diff, all_gather_stack, rank_world, reduce_scatter_stack
from attnkit.masks import causal
from attnkit.ops.dense.call import attention


@dataclass(frozen=True)
class Task:
    """Queries ``[start + a, start + b)`` of the document starting at ``start`` against keys ``[start, start + b)``."""

    doc: int
    start: int
    a: int
    b: int

    @property
    def pairs(self) -> int:
        """(query, key) pairs: ``sum_{i=a}^{b-1} (i + 1)``."""
        return (self.b - self.a) * (self.a + self.b + 1) // 2


@dataclass(frozen=True)
class Plan:
    """Tasks per rank for documents ``lengths`` packed in order over ``world`` ranks of ``N / world`` tokens."""

    lengths: tuple[int, ...]
    world: int
    tasks: tuple[tuple[Task, ...], ...]

    @property
    def n(self) -> int:
        return sum(self.lengths)


def _check(lengths, world: int, block: int = 1) -> tuple[int, ...]:
    lengths = tuple(int(x) for x in lengths)
    if not lengths or any(x < 1 for x in lengths):
        raise ValueError(f"cad: lengths must be positive document lengths, got {lengths}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1 or sum(lengths) % world:
        raise ValueError(f"cad: world must be a positive int dividing the packed length {sum(lengths)}, got {world}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"cad: block must be a positive int, got {block!r}")
    return lengths


def _starts(lengths) -> list[int]:
    out, s = [], 0
    for x in lengths:
        out.append(s)
        s += x
    return out


def contiguous_plan(lengths, world: int) -> Plan:
    """Owner computes: rank ``r`` runs the queries of tokens ``[r N / P, (r + 1) N / P)``."""
    lengths = _check(lengths, world)
    shard = sum(lengths) // world
    tasks: list[list[Task]] = [[] for _ in range(world)]
    for d, (s, ln) in enumerate(zip(_starts(lengths), lengths, strict=True)):
        for r in range(s // shard, (s + ln - 1) // shard + 1):
            a, b = max(s, r * shard) - s, min(s + ln, (r + 1) * shard) - s
            tasks[r].append(Task(d, s, a, b))
    return Plan(lengths, world, tuple(tuple(t) for t in tasks))


def plan_cad(lengths, world: int, *, block: int = 128) -> Plan:
    """Balance attention FLOPs: cut documents into query blocks of ``<= block`` tokens, place the tasks
    longest first on the least loaded rank (ties: the rank that owns the block's first query, then rank order).

    Args:
        lengths: document lengths, packed in order; their sum must divide by ``world``.
        world: number of ranks ``P``.
        block: the largest query range of one task (tasks below the kernel tile lose efficiency).

    Returns:
        a :class:`Plan`; every query token is in exactly one task.
    """
    lengths = _check(lengths, world, block)
    shard = sum(lengths) // world
    tasks = [Task(d, s, a, min(a + block, ln))
             for d, (s, ln) in enumerate(zip(_starts(lengths), lengths, strict=True)) for a in range(0, ln, block)]
    tasks.sort(key=lambda t: (-t.pairs, t.start + t.a))
    heap = [(0, r) for r in range(world)]
    out: list[list[Task]] = [[] for _ in range(world)]
    for t in tasks:
        load, r = heap[0]
        owner = (t.start + t.a) // shard
        if next((ld for ld, rr in heap if rr == owner), None) == load:
            r = owner  # equal load: keep the task at home (no transfer)
            heap = [(ld, rr) for ld, rr in heap if rr != owner]
            heapq.heapify(heap)
        else:
            heapq.heappop(heap)
        out[r].append(t)
        heapq.heappush(heap, (load + t.pairs, r))
    return Plan(lengths, world, tuple(tuple(sorted(t, key=lambda x: x.start + x.a)) for t in out))


@dataclass(frozen=True)
class Simulation:
    """Per-rank forward attention FLOPs (``4 H D`` per pair) and tokens fetched from other ranks' shards."""

    flops: tuple[float, ...]
    fetched_tokens: tuple[int, ...]

    @property
    def max_flops(self) -> float:
        return max(self.flops)

    @property
    def imbalance(self) -> float:
        """max / mean (1 is perfect balance)."""
        return max(self.flops) / (sum(self.flops) / len(self.flops))


def simulate(plan: Plan, *, heads: int = 1, head_dim: int = 1) -> Simulation:
    """Run the plan on paper: FLOPs per rank and the query + key/value tokens each rank must fetch."""
    shard = plan.n // plan.world
    flops, fetched = [], []
    for r, ts in enumerate(plan.tasks):
        flops.append(4.0 * heads * head_dim * sum(t.pairs for t in ts))
        need: set[int] = set()
        for t in ts:  # keys [start, start + b) and queries [start + a, start + b): union per rank
            need.update(range(t.start, t.start + t.b))
        fetched.append(sum(1 for i in need if i // shard != r))
    return Simulation(tuple(flops), tuple(fetched))


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_stack(x, group) if rank_world(group)[1] > 1 else x[0]

    @staticmethod
    def backward(ctx, g):
        return (all_gather_stack(g, ctx.group) if rank_world(ctx.group)[1] > 1 else g[None]), None


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    P = rank_world(group)[1]
    s = all_gather_diff(x, group)  # (P, B, n, H, D)
    return s.transpose(0, 1).reshape(x.shape[0], P * x.shape[1], *x.shape[2:])  # (B, P n, H, D)


def cad_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, *, scale: float | None = None,
                  group=None) -> torch.Tensor:
    """Document-masked causal attention of a packed sequence, computed by the ranks ``plan`` assigns.

    Args:
        q, k: this rank's contiguous shard ``(B, N / P, H, D)`` of the packed sequence; v: ``(B, N / P, H, Dv)``.
        plan: from :func:`plan_cad` (or :func:`contiguous_plan`) with ``world == P`` and ``sum(lengths) == N``.
        scale: score scale (default ``1 / sqrt(D)``).
        group: the process group (None: the default group).

    Returns:
        this rank's rows ``(B, N / P, H, Dv)``; differentiable in q, k and v.
    """
    rank, world = rank_world(group)
    if plan.world != world or plan.n != world * q.shape[1]:
        raise ValueError(f"cad_attention: the plan is for {plan.world} ranks and {plan.n} tokens, got {world} "
                         f"ranks of {q.shape[1]} tokens")
    Q, K, V = (_gather(t, group) for t in (q, k, v))  # (B, N, H, .)
    B, N, H, _ = Q.shape
    rows, outs = [], []
    for t in plan.tasks[rank]:
        qs = Q[:, t.start + t.a:t.start + t.b]  # (B, b - a, H, D)
        ks, vs = K[:, t.start:t.start + t.b], V[:, t.start:t.start + t.b]  # (B, b, H, .)
        outs.append(attention(qs, ks, vs, causal(t.a), scale=scale))
        rows.append(torch.arange(t.start + t.a, t.start + t.b))
    full = V.new_zeros(B, N, H, V.shape[-1])
    if outs:
        full = full.index_add(1, torch.cat(rows).to(full.device), torch.cat(outs, 1))
    full = full.view(B, world, N // world, H, -1).transpose(0, 1)  # (P, B, N / P, H, Dv): slot r goes to rank r
    return _ReduceScatter.apply(full, group)


# A documented packed batch (one 16K-token sequence, long-tailed as in the paper's motivation: one long document,
# a few medium ones, many short ones) for the planner's acceptance figure.
DOCUMENTED_LENGTHS = (6144, 3072, 2048, 1024, 1024, 512, 512, 512, 256, 256, 256, 256, *(128,) * 4)
