"""Run a function on P local processes joined in one ``torch.distributed`` group (gloo on CPU).

This is how the context-parallel ops are tested against the single-process result, and a quick
way to try them without ``torchrun``:

    >>> from attnkit.distributed.launch import run_local
    >>> if __name__ == "__main__":                  # required in a script: see run_local
    ...     results = run_local(my_worker, 4, payload)   # my_worker(rank, world, payload) -> picklable

``fn`` must be importable by name (a module-level function), because the workers are spawned
processes. Each worker pins torch to ``threads`` intra-op threads so P workers share the
machine's cores instead of oversubscribing them. A worker that raises makes ``run_local`` raise
with that worker's traceback as soon as it exits; the other workers are killed at once (they are
typically blocked in a collective waiting for it).
"""

from __future__ import annotations

import ast
import datetime
import multiprocessing
import multiprocessing.connection
import os
import sys
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

GUARD_HELP = ('spawned workers re-import the main module, so a script must call run_local under '
              '`if __name__ == "__main__":` (or from a function called there)')

# a failure inside a collective after a peer had already returned means the ranks ran different collectives
_COLLECTIVE_MARKERS = ("Connection closed", "Connection reset", "gloo", "NCCL", "nccl", "timed out", "Timed out")


def _save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temporary name, so the parent never reads a half-written file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _worker(rank: int, world: int, out_dir: str, threads: int, backend: str, timeout_s: float,
            fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(threads)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        # rendezvous through a file in this launch's own temp dir: no TCP port to pick, so launches
        # running at the same time cannot collide
        dist.init_process_group(backend, init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, world, *args)
    except BaseException:
        _save({"ok": False, "error": traceback.format_exc(), "time": time.time()}, path)
        sys.stdout.flush()
        sys.stderr.flush()
        # exit now, without destroy_process_group: the peers may be inside a collective with this rank,
        # and a clean shutdown would wait for them; the parent kills them when it sees this exit
        os._exit(1)
    _save({"ok": True, "value": value, "time": time.time()}, path)
    dist.destroy_process_group()


def _is_main_guard(test: ast.expr) -> bool:
    """Whether an ``if`` test compares ``__name__`` with ``"__main__"`` (either order, maybe inside and/or)."""
    for node in ast.walk(test):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if any(isinstance(p, ast.Name) and p.id == "__name__" for p in parts) and any(
                    isinstance(p, ast.Constant) and p.value == "__main__" for p in parts):
                return True
    return False


def unguarded_line(source: str, lineno: int) -> bool:
    """Whether line ``lineno`` of a module's ``source`` runs at import, outside ``if __name__ == "__main__":``.

    Returns False where it cannot tell (the source does not parse, or the line is in no statement).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False

    def inside(body: list[ast.stmt]) -> bool | None:
        for stmt in body:
            end = getattr(stmt, "end_lineno", stmt.lineno)
            if not stmt.lineno <= lineno <= end:
                continue
            if isinstance(stmt, ast.If) and _is_main_guard(stmt.test):
                return False  # guarded (the else branch of such an if is not a place to launch from either,
                # but nobody writes that)
            if isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                children = [getattr(stmt, f, []) for f in ("body", "orelse", "finalbody")]
                children += [h.body for h in getattr(stmt, "handlers", [])]
                for ch in children:
                    found = inside(ch)
                    if found is not None:
                        return found
            return True
        return None

    return bool(inside(tree.body))


def _check_main_guard() -> None:
    """Refuse a launch that would make every spawned worker launch again.

    Under the ``spawn`` start method each worker imports the caller's main module as ``__mp_main__``:
    a call of run_local at its top level, unguarded, runs again in every worker (where
    multiprocessing then fails while bootstrapping and the parent only sees workers exit).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"run_local: called while a spawned worker imports the main module; {GUARD_HELP}")
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return  # interactive session or python -c: no module to re-import
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return
    try:
        source = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return
    if unguarded_line(source, frame.f_lineno):
        raise RuntimeError(f"run_local: {path} calls it at line {frame.f_lineno} at the top level of the main "
                           f"module; {GUARD_HELP}")


def _kill(procs: list[Any]) -> None:
    for p in procs:
        if p.exitcode is None:
            p.kill()
    for p in procs:
        p.join(timeout=10)


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
              threads: int = 1, timeout_s: float = 300.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own process.

    The workers are *spawned*: each imports the caller's main module afresh. In a script, call
    run_local under ``if __name__ == "__main__":`` (directly or through a function called there);
    an unguarded top-level call would launch again in every worker, so it is refused with a
    RuntimeError before anything starts.

    Every rank must run the same collectives in the same order. In particular the ranks must agree on
    whether the inputs of a context-parallel op require grad: the backward is a collective, and a rank
    that skips it leaves its peers waiting. When a rank fails inside a collective after another rank
    had already returned, the error says so.

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

    Raises:
        RuntimeError: a rank raised (its traceback first; raised as soon as that rank exits, the others
            being killed at once), a rank died without a result, the launch passed ``timeout_s``, or the
            call is not guarded as above.
    """
    int_arg("world_size", world_size, 1)
    _check_main_guard()
    with tempfile.TemporaryDirectory(prefix="attnkit_dist_") as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, out_dir, threads, backend, timeout_s, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        procs = list(ctx.processes)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                alive = [p for p in procs if p.exitcode is None]
                if not alive or any(p.exitcode not in (None, 0) for p in procs):
                    break  # all done, or one failed: the others are torn down below without waiting
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"run_local: {world_size} workers did not finish within {timeout_s:g} s")
                multiprocessing.connection.wait([p.sentinel for p in alive], timeout=min(left, 1.0))
        finally:
            _kill(procs)  # no-op for exited workers
        return _collect(out_dir, procs)


def _collect(out_dir: str, procs: list[Any]) -> list[Any]:
    """The ranks' values in rank order, or a RuntimeError about the first rank to fail."""
    world = len(procs)
    results = {}
    for r in range(world):
        path = Path(out_dir) / f"rank{r}.pt"
        if path.exists():
            results[r] = torch.load(path, weights_only=False)
    failed = sorted((r for r, res in results.items() if not res["ok"]), key=lambda r: results[r]["time"])
    if failed:  # the first to fail is the cause; the others typically lost a peer in a collective
        first = results[failed[0]]
        others = "".join(f"\n  rank {r}: {results[r]['error'].strip().splitlines()[-1][:160]}" for r in failed[1:])
        msg = f"rank {failed[0]} of {world} failed first:\n{first['error']}" + (f"\nthen:{others}" if others else "")
        done = [r for r, res in results.items() if res["ok"] and res["time"] <= first["time"]]
        if done and any(m in first["error"] for m in _COLLECTIVE_MARKERS):
            msg += (f"\nranks {done} had already returned when rank {failed[0]} failed in a collective: the ranks did "
                    "not run the same collectives (for instance the inputs of a context-parallel op required grad "
                    "on some ranks only, so only those ran its backward; requires_grad must agree across ranks)")
        raise RuntimeError(msg)
    dead = {r: p.exitcode for r, p in enumerate(procs) if r not in results}
    if dead:
        how = ", ".join(f"rank {r}: " + (f"signal {-c}" if c is not None and c < 0 else f"exit code {c}")
                        for r, c in dead.items())
        raise RuntimeError(f"run_local: ranks {sorted(dead)} of {world} exited without a result ({how}); if the "
                           f"script does not guard its call, {GUARD_HELP}")
    return [results[r]["value"] for r in range(world)]
