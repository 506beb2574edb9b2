"""Timing helpers shared by the distributed benchmark scripts (run inside each run_local worker)."""

from __future__ import annotations

import time

import torch.distributed as dist

from attnkit.distributed.launch import run_local

CORES = 2


def run_worlds(worker, cfg: dict, worlds=(1, 2, 4)) -> dict:
    """``{P: [each rank's result]}`` of ``worker(rank, P, cfg)`` on P local processes, the machine's
    ``CORES`` threads split among them (one thread per rank from P = 2 on a 2-core machine)."""
    return {P: run_local(worker, P, cfg, threads=max(1, CORES // P)) for P in worlds}


def slowest(ranks: list[dict]) -> dict:
    """A step takes as long as its slowest rank: the per-key maximum over ranks."""
    return {k: max(r[k] for r in ranks) for k in ranks[0]}


def timed(fns: dict, warmup: int, reps: int, cpu: bool = False) -> dict:
    """Median wall seconds per function (and ``"<name> cpu"``: process CPU seconds, with ``cpu``),
    calling them in turn after a barrier, so every rank times the same step."""
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
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    out = {n: med(v) for n, v in ts.items()}
    if cpu:
        out.update({f"{n} cpu": med(v) for n, v in cs.items()})
    return out


def fwd_bwd(fn, leaves):
    """One forward+backward of ``fn()`` (sum of the output) with fresh gradients of ``leaves``."""
    def run():
        for t in leaves:
            t.grad = None
        fn().sum().backward()
    return run
