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

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, threads: int, backend: str,
            fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        torch.save({"ok": True, "value": fn(rank, world, *args)}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
              threads: int = 1) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own process.

    Args:
        fn: module-level function ``fn(rank, world, *args)``; the process group is initialised before
            it runs (``torch.distributed.get_rank()`` works) and destroyed after.
        world_size: number of processes P (>= 1).
        args: picklable arguments (tensors included) passed to every rank.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        threads: torch intra-op threads per worker.

    Returns:
        each rank's return value, in rank order (tensors come back through ``torch.save``).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    with tempfile.TemporaryDirectory(prefix="attnkit_dist_") as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, _free_port(), out_dir, threads, backend, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join():
                pass
        except mp.ProcessRaisedException:
            pass  # the worker's own traceback is in its result file, reported below
        results = {}
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if path.exists():
                results[r] = torch.load(path, weights_only=False)
        for r, res in results.items():  # a failed rank first: the others were stopped because of it
            if not res["ok"]:
                raise RuntimeError(f"rank {r} of {world_size} failed:\n{res['error']}")
        missing = [r for r in range(world_size) if r not in results]
        if missing:
            raise RuntimeError(f"ranks {missing} of {world_size} exited without a result")
        return [results[r]["value"] for r in range(world_size)]
