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
        fork: fork the zygote from this process instead of starting an interpreter (saves the
            torch import). Only safe while this process has run no parallel torch op and has
            no other threads: the CLI does it first thing.
    """

    def __init__(self, providers: list[str], threads: int, mem_limit_gb: float | None,
                 log_path: str | os.PathLike[str], builtin: bool = True, fork: bool = False) -> None:
        self.cfg = {"providers": list(providers), "threads": threads, "mem_limit_gb": mem_limit_gb,
                    "builtin": builtin}
        self.log_path = log_path
        self.fork = fork
        self.pid: int | None = None
        self._child: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.ready: dict[str, Any] = {}

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 300.0) -> dict[str, Any]:
        """Launch the zygote and wait until it has discovered the cases."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the zygote (forked from here when ``fork=True``, else a fresh interpreter); no wait."""
        if self.pid is not None:
            return
        self._log = open(self.log_path, "ab")
        if self.fork:
            from attnkit.bench.worker import forked_zygote

            cmd_r, cmd_w = os.pipe()
            ev_r, ev_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(cmd_w)
                os.close(ev_r)
                forked_zygote(self.cfg, cmd_r, ev_w, self._log.fileno())
            os.close(cmd_r)
            os.close(ev_w)
            self.pid = pid
            self._stdin = os.fdopen(cmd_w, "wb")
            self._stdout = os.fdopen(ev_r, "rb")
        else:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "attnkit.bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self._log, env=env, start_new_session=True,  # Ctrl-C reaches only the parent
            )
            self.pid = self.proc.pid
            self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
            self._send(self.cfg)
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self, timeout: float = 300.0) -> dict[str, Any]:
        """Wait for the zygote's ``ready`` event (it carries the providers' import errors)."""
        if self.ready:
            return self.ready
        ev = self._next(timeout)
        if ev is None or ev.get("event") != "ready":
            raise WorkerError(f"benchmark worker did not start (see {self.log_path})")
        self.ready = ev
        return ev

    def _read(self) -> None:
        for line in self._stdout:
            try:
                self.q.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.q.put(None)  # EOF: the zygote is gone

    def _send(self, obj: dict[str, Any]) -> None:
        self._stdin.write((json.dumps(obj) + "\n").encode())
        self._stdin.flush()

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
                self._child = pid
            elif kind == "begin":
                out.current, out.phase, last = ev["id"], ev["phase"], time.monotonic()
            elif kind == "exit":
                out.signal, out.code = ev.get("signal"), ev.get("code")
                self._child = None
                return out
            elif kind == "crash":
                out.crash = ev.get("reason")
            elif kind in ("result", "mem", "roof", "native"):
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
        if self.pid is None:
            return
        if self._child is not None:  # left mid-job (a second Ctrl-C): the child goes first
            try:
                os.kill(self._child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._child = None
        try:
            self._send({"job": "quit"})
            self._stdin.close()
        except (OSError, ValueError):
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            end = time.monotonic() + 5
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > end:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.02)
        self._log.close()
        self.pid = None
