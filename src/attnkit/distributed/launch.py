"""Run a function on P local processes joined in one ``torch.distributed`` group (gloo on CPU).

This is how the context-parallel ops are tested against the single-process result, and a quick
way to try them without ``torchrun``:

    >>> from attnkit.distributed.launch import run_local
    >>> results = run_local(my_worker, 4, payload)   # my_worker(rank, world, payload) -> anything picklable

``fn`` must be importable by name (a module-level function), because the workers are spawned
processes. Each worker pins torch to ``threads`` intra-op threads so P workers share the
machine's cores instead of oversubscribing them. A worker that raises makes ``run_local`` raise
with that worker's traceback.
"""

from __future__ import annotations

import datetime
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnkit._validate import int_arg


def _worker(rank: int, world: int, out_dir: str, threads: int, backend: str, timeout_s: float,
            fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(threads)
    # rendezvous through a file in this launch's own temp dir: no TCP port to pick, so launches
    # running at the same time cannot collide
    dist.init_process_group(backend, init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        torch.save({"ok": True, "value": fn(rank, world, *args)}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
              threads: int = 1, timeout_s: float = 300.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own process.

    Args:
        fn: module-level function ``fn(rank, world, *args)``; the process group is initialised before
            it runs (``torch.distributed.get_rank()`` works) and destroyed after.
        world_size: number of processes P (>= 1).
        args: picklable arguments (tensors included) passed to every rank.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        threads: torch intra-op threads per worker.
        timeout_s: the whole launch, and any one collective, may take this long; then the workers are
            killed and a RuntimeError says so (a rank that never joins a collective cannot hang the caller).

    Returns:
        each rank's return value, in rank order (tensors come back through ``torch.save``).
    """
    int_arg("world_size", world_size, 1)
    with tempfile.TemporaryDirectory(prefix="attnkit_dist_") as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, out_dir, threads, backend, timeout_s, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise RuntimeError(f"run_local: {world_size} workers did not finish within {timeout_s:g} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            pass  # a raising worker left its traceback in its result file; a killed one left none (both below)
        results, written = {}, {}
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if path.exists():
                results[r], written[r] = torch.load(path, weights_only=False), path.stat().st_mtime_ns
        failed = sorted((r for r, res in results.items() if not res["ok"]), key=written.get)
        if failed:  # the first to fail is the cause; the others typically lost a peer in a collective
            first = results[failed[0]]["error"]
            others = "".join(f"\n  rank {r}: {results[r]['error'].strip().splitlines()[-1][:160]}" for r in failed[1:])
            raise RuntimeError(f"rank {failed[0]} of {world_size} failed first:\n{first}"
                               + (f"\nthen:{others}" if others else ""))
        missing = [r for r in range(world_size) if r not in results]
        if missing:
            raise RuntimeError(f"ranks {missing} of {world_size} exited without a result")
        return [results[r]["value"] for r in range(world_size)]
