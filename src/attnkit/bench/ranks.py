"""Timing and byte counting inside the ranks of a multi-process benchmark (context parallelism).

The harness measures one process; a context-parallel op needs P processes that time the same
step together. These helpers are what ``benchmarks/distributed_*_perf.py`` are built from:

* :func:`run_worlds` runs ``worker(rank, P, cfg)`` on P local gloo processes for each P, the
  machine's threads split among the ranks (:func:`attnkit.distributed.run_local`);
* :func:`timed` (inside a worker) alternates the functions after a barrier and keeps each one's
  median wall time (and process CPU time: busy time, which contention on the cores does not
  inflate); :func:`slowest` reduces the ranks' figures to the step time;
* :class:`CommCounter` counts the bytes this rank receives through the collectives it calls.

Example:
    >>> def worker(rank, world, cfg):
    ...     q = k = v = torch.randn(1, cfg["N"] // world, 8, 64, requires_grad=True)
    ...     f = lambda: ring_attention(q, k, v, causal=True)
    ...     res = timed({"fwd": f, "fwd+bwd": fwd_bwd(f, (q, k, v))}, warmup=1, reps=3)
    ...     with CommCounter(world) as c:
    ...         f()
    ...     return {**res, "bytes fwd": c.bytes}
    >>> {P: slowest(ranks) for P, ranks in run_worlds(worker, {"N": 4096}).items()}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from attnkit.bench.machine import default_threads

COLLECTIVES = ("batch_isend_irecv", "all_to_all", "all_gather", "reduce_scatter", "all_reduce")


def run_worlds(worker: Callable[[int, int, dict], Any], cfg: dict, worlds: Iterable[int] = (1, 2, 4),
               cores: int | None = None) -> dict[int, list[Any]]:
    """``{P: [each rank's result]}`` of ``worker(rank, P, cfg)`` on P local processes; the ``cores``
    threads (default :func:`attnkit.bench.machine.default_threads`) are split among the ranks, at
    least one each (so P above ``cores`` oversubscribes the machine)."""
    from attnkit.distributed import run_local

    cores = cores or default_threads()
    return {P: run_local(worker, P, cfg, threads=max(1, cores // P)) for P in worlds}


def slowest(ranks: Sequence[dict]) -> dict:
    """A step takes as long as its slowest rank: the per-key maximum over the ranks' results."""
    return {k: max(r[k] for r in ranks) for k in ranks[0]}


def timed(fns: dict[str, Callable[[], Any]], warmup: int, reps: int, cpu: bool = False) -> dict[str, float]:
    """Median wall seconds per function (and ``"<name> cpu"``: process CPU seconds, with ``cpu``),
    calling them in turn after a barrier, so every rank times the same step; ``warmup`` untimed
    rounds first. Call it on every rank of an initialised process group."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {n: [] for n in fns}
    cs: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            dist.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            ts[n].append(time.perf_counter() - t0)
            cs[n].append(time.process_time() - c0)

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    out = {n: med(v) for n, v in ts.items()}
    if cpu:
        out.update({f"{n} cpu": med(v) for n, v in cs.items()})
    return out


def fwd_bwd(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]) -> Callable[[], None]:
    """One forward+backward of ``fn()`` (the sum of its output) with fresh gradients of ``leaves``."""
    def run() -> None:
        for t in leaves:
            t.grad = None
        fn().sum().backward()
    return run


class CommCounter:
    """Count the bytes this rank receives through ``torch.distributed`` collectives while active.

    ``bytes``: payload received from other ranks -- ``batch_isend_irecv``: the receive buffers;
    ``all_to_all``: the pieces from other ranks; ``all_gather``: ``P - 1`` of the gathered pieces;
    ``reduce_scatter``: ``P - 1`` output-sized pieces; ``all_reduce``: ``2 (P - 1) / P`` of the
    buffer (a ring all-reduce). ``meta``: the same for int64 tensors (shape checks), kept apart.
    ``calls``: collectives called. Wraps the functions of ``torch.distributed`` on entry and
    restores them on exit; the ops call them through the module, so the wrappers see every call.
    """

    def __init__(self, world: int) -> None:
        self.world, self.bytes, self.meta, self.calls = world, 0, 0, 0
        self._orig = {n: getattr(dist, n) for n in COLLECTIVES}

    def _add(self, nbytes: int, dtype: torch.dtype) -> None:
        self.calls += 1
        if dtype == torch.int64:
            self.meta += nbytes
        else:
            self.bytes += nbytes

    def __enter__(self) -> CommCounter:
        P, orig = self.world, self._orig

        def batch_isend_irecv(ops):
            for o in ops:
                if o.op is dist.irecv:
                    self._add(o.tensor.numel() * o.tensor.element_size(), o.tensor.dtype)
            return orig["batch_isend_irecv"](ops)

        def all_to_all(recv, send, group=None, *a, **k):
            me = dist.get_rank(group)
            for i, r in enumerate(recv):
                if i != me:
                    self._add(r.numel() * r.element_size(), r.dtype)
            return orig["all_to_all"](recv, send, group, *a, **k)

        def all_gather(out, x, *a, **k):
            self._add((len(out) - 1) * x.numel() * x.element_size(), x.dtype)
            return orig["all_gather"](out, x, *a, **k)

        def reduce_scatter(out, xs, *a, **k):
            self._add((P - 1) * out.numel() * out.element_size(), out.dtype)
            return orig["reduce_scatter"](out, xs, *a, **k)

        def all_reduce(x, *a, **k):
            self._add(2 * (P - 1) * x.numel() * x.element_size() // P, x.dtype)
            return orig["all_reduce"](x, *a, **k)

        for name, f in zip(COLLECTIVES, (batch_isend_irecv, all_to_all, all_gather, reduce_scatter, all_reduce)):
            setattr(dist, name, f)
        return self

    def __exit__(self, *exc: object) -> None:
        for n, f in self._orig.items():
            setattr(dist, n, f)
