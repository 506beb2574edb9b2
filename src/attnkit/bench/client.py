"""The parent's side of the worker protocol: start the zygote, run jobs, enforce timeouts.

See :mod:`attnkit.bench.worker`. One job at a time; a job ends when the zygote reports
the child's exit. The watchdog kills a child whose current call has run longer than
the timeout; ``should_stop`` (Ctrl-C) kills it too. Either way the zygote survives,
so the next job starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobOutcome:
    """What came back from one job: its events, how the child ended and why it was stopped."""

    events: list[dict[str, Any]] = field(default_factory=list)
    signal: int | None = None
    code: int | None = None
    killed: str | None = None  # "timeout" or "interrupted" when the parent killed the child
    current: str | None = None  # the case id in flight when the child ended
    phase: str | None = None
    crash: str | None = None


class WorkerError(RuntimeError):
    """The zygote itself died or did not start."""


class Worker:
    """A running zygote. Use as a context manager.

    Args:
        providers: extra case providers (``module:function`` / ``file.py:function``).
        threads: torch threads in each job's child.
        mem_limit_gb: cap on a child's private memory (``RLIMIT_DATA``); None: no cap.
        log_path: the zygote's and children's stderr (compile logs, warnings) go here.
    """

    def __init__(self, providers: list[str], threads: int, mem_limit_gb: float | None,
                 log_path: str | os.PathLike[str], builtin: bool = True) -> None:
        self.cfg = {"providers": list(providers), "threads": threads, "mem_limit_gb": mem_limit_gb,
                    "builtin": builtin}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.ready: dict[str, Any] = {}

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 300.0) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attnkit.bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=env, start_new_session=True,  # Ctrl-C reaches only the parent
        )
        threading.Thread(target=self._read, daemon=True).start()
        self._send(self.cfg)
        ev = self._next(timeout)
        if ev is None or ev.get("event") != "ready":
            raise WorkerError(f"benchmark worker did not start (see {self.log_path})")
        self.ready = ev
        return ev

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.q.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.q.put(None)  # EOF: the zygote is gone

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def _next(self, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while True:
            try:
                return self.q.get(timeout=min(0.1, max(end - time.monotonic(), 0.001)))
            except queue.Empty:
                if time.monotonic() >= end:
                    return None

    def run_job(self, job: dict[str, Any], *, timeout_s: float,
                on_event: Callable[[dict[str, Any]], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> JobOutcome:
        """Run one job; return when its child has exited.

        Args:
            job: the job message (see :mod:`attnkit.bench.worker`).
            timeout_s: longest one call (between two ``begin`` events) may take.
            on_event: sees every event as it arrives (live display).
            should_stop: polled every 0.1 s; True kills the child (Ctrl-C).
        """
        out = JobOutcome()
        self._send(job)
        pid = None
        last = time.monotonic()
        while True:
            try:
                ev = self.q.get(timeout=0.1)
            except queue.Empty:
                ev = {}
            if ev is None:
                raise WorkerError(f"benchmark worker exited (see {self.log_path})")
            kind = ev.get("event")
            if kind == "forked":
                pid, last = ev["pid"], time.monotonic()
            elif kind == "begin":
                out.current, out.phase, last = ev["id"], ev["phase"], time.monotonic()
            elif kind == "exit":
                out.signal, out.code = ev.get("signal"), ev.get("code")
                return out
            elif kind == "crash":
                out.crash = ev.get("reason")
            elif kind in ("result", "mem", "roof"):
                out.events.append(ev)
                if kind == "result" and ev.get("id") == out.current:
                    out.current = None
            if ev and on_event is not None:
                on_event(ev)
            if pid is not None and out.killed is None:
                if should_stop():
                    out.killed = "interrupted"
                elif time.monotonic() - last > timeout_s:
                    out.killed = "timeout"
                if out.killed:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self._send({"job": "quit"})
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.proc = None
