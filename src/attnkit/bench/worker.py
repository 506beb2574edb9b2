"""The benchmark's worker: an idle "zygote" process that forks one child per job.

Why: a case can hang, crash or exhaust memory, and peak memory is only honest in a
fresh process -- but importing torch costs seconds. The zygote imports torch and
discovers the cases once, *without running any parallel op* (a forked child of a
process whose OpenMP pool exists hangs), then forks a child per job: a child inherits
the imports and the case list for free, sets its thread count, runs one job and
exits. The parent talks to the zygote over stdin/stdout in JSON lines; the zygote's
real stdout is moved to stderr so stray prints cannot corrupt the protocol.

Jobs: ``{"job": "unit", "ids": [...], "opts": {...}}`` (time one comparison),
``{"job": "mem", "id": ...}`` (peak RSS of one case), ``{"job": "roof", "dtypes": [...]}``.
Events back: ``ready``, ``forked``, ``begin``, ``result``, ``mem``, ``roof``, ``crash``, ``exit``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback
from typing import Any

_PROTO_FD = 1


def _emit(rec: dict[str, Any]) -> None:
    data = (json.dumps(rec, default=str) + "\n").encode()
    while data:
        n = os.write(_PROTO_FD, data)
        data = data[n:]


def _die_with_parent() -> None:
    try:  # PR_SET_PDEATHSIG = 1: the child is killed if the zygote dies
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _child(job: dict[str, Any], cases: dict[str, Any], cfg: dict[str, Any]) -> None:
    import torch

    from attnkit.bench import machine, memory, timing

    _die_with_parent()
    torch.set_num_threads(int(cfg["threads"]))
    memory.limit_memory(cfg.get("mem_limit_gb"))
    kind = job["job"]
    if kind == "roof":
        for dt in job["dtypes"]:
            try:
                roof = machine.measure_roof(dt, sizes=tuple(job.get("sizes", (1024, 2048, 3072))),
                                            seconds=job.get("seconds", 1.0))
                _emit({"event": "roof", "dtype": dt, "gflops": roof["gflops"], "by_size": roof["by_size"]})
            except Exception as exc:
                _emit({"event": "roof", "dtype": dt, "gflops": None, "reason": repr(exc)})
        # the optional compiled kernels build here, once per run and machine (a one-off cost recorded
        # in the run line), so no case's first call carries the build; later children load the cache
        from attnkit.kernels import native

        t0 = time.perf_counter()
        native.available()
        _emit({"event": "native", "status": native.status(), "build_s": time.perf_counter() - t0})
        return
    missing = [i for i in job.get("ids", [job.get("id")]) if i not in cases]
    for i in missing:
        _emit({"event": "result", "id": i, "status": "error", "reason": "case not found in worker"})
    if kind == "unit":
        timing.measure_unit([cases[i] for i in job["ids"] if i in cases], job["opts"], _emit)
    elif kind == "mem" and job["id"] in cases:
        timing.measure_memory(cases[job["id"]], _emit)


def serve(cfg: dict[str, Any], commands: Any) -> None:
    """Discover the cases, then fork a child per job read from ``commands`` (a text stream)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no thread pools to lose at fork
    import torch

    torch.set_num_threads(1)  # discovery may run small ops: keep OpenMP's pool unborn
    from attnkit.bench.discover import discover

    found, errors = discover(cfg.get("providers", []), builtin=cfg.get("builtin", True))
    cases = {c.id: c for c in found}
    _emit({"event": "ready", "n_cases": len(cases), "errors": errors})
    for line in commands:
        job = json.loads(line)
        if job.get("job") == "quit":
            break
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(job, cases, cfg)
            except BaseException as exc:
                _emit({"event": "crash", "reason": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-2000:]})
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _emit({"event": "forked", "pid": pid})
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            _emit({"event": "exit", "pid": pid, "signal": os.WTERMSIG(status)})
        else:
            _emit({"event": "exit", "pid": pid, "code": os.WEXITSTATUS(status)})


def forked_zygote(cfg: dict[str, Any], cmd_fd: int, proto_fd: int, log_fd: int) -> None:
    """Body of a zygote forked from the parent (which must not have run a parallel torch op yet)."""
    global _PROTO_FD
    os.setsid()  # Ctrl-C in the terminal reaches only the parent
    _PROTO_FD = proto_fd
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    code = 0
    try:
        serve(cfg, os.fdopen(cmd_fd, "r"))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def main() -> None:
    """Entry point of a spawned zygote: config and jobs on stdin, events on (the original) stdout."""
    global _PROTO_FD
    _PROTO_FD = os.dup(1)
    os.dup2(2, 1)  # stray prints (compile logs, warnings) go to the log, not the protocol
    cfg = json.loads(sys.stdin.readline())
    serve(cfg, sys.stdin)


if __name__ == "__main__":
    main()
