"""Run a suite: discover, filter, plan comparisons, measure them in the worker, record.

A *unit* is the cases of one comparison: same ``group`` and pass. Units run one at a
time in a forked child (interleaved timing, see :mod:`attnkit.bench.timing`); a unit with
a noisy case (p80/p20 above :data:`attnkit.bench.results.NOISY_SPREAD`) is timed once
more and the second measurement kept; then each case's peak memory is measured in its
own fresh child; then every case of the unit is appended to ``results.jsonl``. A rerun
skips recorded cases (``--force``: reruns them); Ctrl-C stops after killing the unit in
flight (nothing recorded is lost, nothing half-done is written).
"""

from __future__ import annotations

import fnmatch
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.bench.case import Case
from attnkit.bench.client import JobOutcome, Worker
from attnkit.bench.discover import discover, peer_installed
from attnkit.bench.machine import default_threads, machine_info
from attnkit.bench.results import NOISY_SPREAD, ResultsFile, baseline_times, case_record, load
from attnkit.bench.suites import Suite, get_suite


@dataclass(frozen=True)
class BenchOptions:
    """What ``attnkit bench`` was asked to do (see the CLI for each flag)."""

    suite: str = "default"
    out: str = "bench-results"
    only: tuple[str, ...] = ()
    backend: tuple[str, ...] = ()
    dtype: tuple[str, ...] = ()
    passes: tuple[str, ...] = ()
    case_timeout_s: float | None = None
    repeat: int | None = None
    threads: int | None = None
    memory: bool | None = None
    mem_limit_gb: float | None = None
    providers: tuple[str, ...] = ()
    builtin: bool = True
    retry_failed: bool = False
    force: bool = False


@dataclass
class RunSummary:
    """What one invocation did."""

    out: Path
    results_path: Path
    run_id: str
    selected: int = 0  # cases of the suite that pass the filters (0: nothing to do, the CLI says so)
    planned: int = 0
    skipped_done: int = 0
    recorded: list[dict[str, Any]] = field(default_factory=list)
    not_installed: dict[str, int] = field(default_factory=dict)
    provider_errors: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    wall_s: float = 0.0


def _match(value: str, globs: tuple[str, ...]) -> bool:
    return not globs or any(fnmatch.fnmatchcase(value, g) for g in globs)


def select(cases: list[Case], suite: str, opts: BenchOptions) -> list[Case]:
    """Cases of ``suite`` that pass the filters (``--only`` matches id, op or group)."""
    out = []
    for c in cases:
        if suite not in c.suites:
            continue
        if opts.only and not any(_match(s, opts.only) for s in (c.id, c.op, c.group)):
            continue
        if not _match(c.impl, opts.backend) or not _match(str(c.param.get("dtype", "float32")), opts.dtype):
            continue
        if not _match(c.pass_, opts.passes):
            continue
        out.append(c)
    return out


def units(cases: list[Case]) -> list[list[Case]]:
    """Cases grouped by (group, pass) in first-seen order; the baseline first in each."""
    grouped: dict[tuple[str, str], list[Case]] = {}
    for c in cases:
        grouped.setdefault((c.group, c.pass_), []).append(c)
    return [sorted(u, key=lambda c: not c.baseline) for u in grouped.values()]


def describe_filters(opts: BenchOptions) -> str:
    """The filters of ``opts`` as the CLI spells them (for "nothing matched" messages)."""
    parts = [f"--suite {opts.suite}"]
    for flag, values in (("--only", opts.only), ("--backend", opts.backend), ("--dtype", opts.dtype),
                         ("--pass", opts.passes)):
        parts += [f"{flag} {v}" for v in values]
    return " ".join(parts)


def series_key(c: Case) -> tuple[Any, ...]:
    """Cases that differ only in ``N`` form a series (for the scaling suite's stop rule)."""
    return (c.op, c.impl, c.pass_, tuple((k, str(v)) for k, v in c.params if k != "N"))


class Harness:
    """Runs one invocation; ``on_event(kind, payload)`` feeds a live display."""

    def __init__(self, opts: BenchOptions, on_event: Callable[[str, Any], None] | None = None,
                 fork_worker: bool = False) -> None:
        self.opts = opts
        self.suite: Suite = get_suite(opts.suite)
        self.on_event = on_event or (lambda kind, payload: None)
        self.stop = False
        self.threads = opts.threads or default_threads()
        self.timeout = opts.case_timeout_s or self.suite.case_timeout_s
        self.memory = self.suite.memory if opts.memory is None else opts.memory
        out = Path(opts.out)
        self.results = ResultsFile(out / "results.jsonl")
        self.summary = RunSummary(out=out, results_path=self.results.path, run_id=uuid.uuid4().hex[:12])
        # fork_worker: fork the worker now, before this process runs any torch op or starts a thread
        # (the CLI's case); otherwise a fresh interpreter is started when there is work to do.
        self.worker = self._worker(fork=True) if fork_worker else None
        if self.worker is not None:
            self.worker.launch()

    def _worker(self, fork: bool) -> Worker:
        return Worker(list(self.opts.providers), self.threads, self.opts.mem_limit_gb,
                      self.summary.out / "worker.log", builtin=self.opts.builtin, fork=fork)

    def _sigint(self, signum: int, frame: Any) -> None:
        if self.stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop = True
        self.on_event("stopping", None)

    def unit_opts(self) -> dict[str, Any]:
        s = self.suite
        return {"repeat": self.opts.repeat or s.repeat, "min_repeat": min(s.min_repeat, self.opts.repeat or s.repeat),
                "warmup_s": s.warmup_s, "min_sample_s": s.min_sample_s, "unit_budget_s": s.unit_budget_s,
                "case_timeout_s": self.timeout}

    def run(self) -> RunSummary:
        t_start = time.perf_counter()
        old = signal.signal(signal.SIGINT, self._sigint)
        try:
            self._run()
        except KeyboardInterrupt:  # a second Ctrl-C: the unit in flight is dropped, the rest is saved
            self.stop = True
        finally:
            signal.signal(signal.SIGINT, old)
            self.summary.interrupted = self.stop
            self.summary.wall_s = time.perf_counter() - t_start
            if self.summary.selected:  # nothing selected: the results file is left as it was
                self.results.append({"kind": "run_end", "run_id": self.summary.run_id, "wall_s": self.summary.wall_s,
                                 "interrupted": self.stop, "recorded": len(self.summary.recorded)})
        return self.summary

    def _run(self) -> None:
        sm = self.summary
        found, sm.provider_errors = discover(list(self.opts.providers), builtin=self.opts.builtin)
        chosen = select(found, self.suite.name, self.opts)
        sm.selected = len(chosen)
        if not chosen:
            if self.worker is not None:
                self.worker.close()
            return
        runnable = []
        for c in chosen:
            if peer_installed(c.requires):
                runnable.append(c)
            else:
                sm.not_installed[c.requires] = sm.not_installed.get(c.requires, 0) + 1  # type: ignore[index]
        done = set() if self.opts.force else self.results.done_ids(retry_failed=self.opts.retry_failed)
        self.base_times = baseline_times(load(self.results.path))
        todo = [c for c in runnable if c.id not in done]
        sm.planned, sm.skipped_done = len(todo), len(runnable) - len(todo)
        self.on_event("plan", {"total": len(todo), "skipped_done": sm.skipped_done,
                               "not_installed": sm.not_installed, "provider_errors": sm.provider_errors})
        w = self.worker or self._worker(fork=False)
        try:
            if not todo:
                self._write_run_line({})
                return
            w.launch()
            w.wait_ready()
            self._measure(w, todo)
        finally:
            w.close()

    def _measure(self, w: Worker, todo: list[Case]) -> None:
        dtypes = sorted({str(c.param.get("dtype", "float32")) for c in todo})
        roof_job = {"job": "roof", "dtypes": dtypes, "sizes": list(self.suite.roof_sizes), "seconds": self.suite.roof_s}
        # the roof job also builds the compiled kernels on a fresh machine (~15 s here): room for a slow one
        out = w.run_job(roof_job, timeout_s=600, should_stop=lambda: self.stop)
        self.roofs = {e["dtype"]: e["gflops"] for e in out.events if e.get("event") == "roof"}
        self.roof_sizes = {e["dtype"]: e.get("by_size") for e in out.events if e.get("event") == "roof"}
        self.native = next(({"status": e["status"], "build_s": e["build_s"]} for e in out.events
                            if e.get("event") == "native"), None)
        self._write_run_line(self.roofs)
        self.on_event("roof", self.roofs)
        stopped: set[tuple[Any, ...]] = set()
        plan = units(todo)
        if self.suite.stop_series_over_s is not None:
            plan.sort(key=lambda u: int(u[0].param.get("N", 0)))
        for unit in plan:
            if self.stop:
                break
            skip = [c for c in unit if series_key(c) in stopped]
            for c in skip:
                self._record(c, {"status": "skipped", "reason": "a smaller N of this series exceeded "
                                 f"{self.suite.stop_series_over_s:g} s or failed"})
            self._run_unit(w, [c for c in unit if c not in skip], stopped)

    def _write_run_line(self, roofs: dict[str, float]) -> None:
        sm = self.summary
        self.results.append({
            "kind": "run", "run_id": sm.run_id, "time": time.time(), "suite": self.suite.name,
            "filters": {"only": self.opts.only, "backend": self.opts.backend, "dtype": self.opts.dtype,
                        "pass": self.opts.passes},
            "machine": machine_info(self.threads), "roof_gflops": roofs,
            "roof_by_size": getattr(self, "roof_sizes", {}) if roofs else {},
            "native_kernels": getattr(self, "native", None), "memory_method": "fresh-fork-rss"
            if self.memory else None, "not_installed": sm.not_installed, "provider_errors": sm.provider_errors,
            "planned": sm.planned, "skipped_done": sm.skipped_done})

    def _time(self, w: Worker, unit: list[Case]) -> dict[str, dict[str, Any]]:
        """One timing job per comparison (more when its child dies mid-unit): a result per case."""
        measured: dict[str, dict[str, Any]] = {}
        pending = list(unit)
        while pending and not self.stop:
            out = w.run_job({"job": "unit", "ids": [c.id for c in pending], "opts": self.unit_opts()},
                            timeout_s=self.timeout, on_event=lambda e: self.on_event("worker", e),
                            should_stop=lambda: self.stop)
            for e in out.events:
                if e.get("event") == "result":
                    measured[e["id"]] = e
            if out.killed == "interrupted":
                return measured  # the caller sees self.stop: nothing of this unit is written
            if out.current is not None and out.current not in measured:
                measured[out.current] = self._abnormal(out)
            before = len(pending)
            pending = [c for c in pending if c.id not in measured]
            if pending and len(pending) == before:
                # no progress: the child ended before any case began (or said nothing about these)
                reason = self._abnormal(out)["reason"] if (out.code or out.signal) else "no result reported"
                for c in pending:
                    measured[c.id] = {"status": "error", "reason": reason}
                pending = []
        return measured

    def _remeasure_noisy(self, w: Worker, unit: list[Case], measured: dict[str, dict[str, Any]]) -> None:
        """When a case's p80/p20 exceeds :data:`NOISY_SPREAD`, time its comparison once more in a fresh
        child -- every ok case of it, interleaved again, so that its ratios to the others stay fair --
        keep the second measurement and record the first beside it (``first_measurement``)."""
        ok = [c for c in unit if measured.get(c.id, {}).get("status") == "ok"]
        if self.stop or not any(measured[c.id]["p80_s"] > NOISY_SPREAD * measured[c.id]["p20_s"] for c in ok):
            return
        again = self._time(w, ok)
        for c in ok:
            first = measured[c.id]
            kept = {k: first[k] for k in ("median_s", "p20_s", "p80_s", "samples") if k in first}
            second = again.get(c.id)
            if second is not None and second.get("status") == "ok":
                measured[c.id] = {**second, "first_measurement": kept}
            else:  # the re-measurement failed: the first one stands, and says why
                why = "interrupted" if second is None else f"{second.get('status')}: {second.get('reason', '')}"
                first["remeasure_failed"] = why[:200]

    def _run_unit(self, w: Worker, unit: list[Case], stopped: set[tuple[Any, ...]]) -> None:
        t_unit = time.perf_counter()
        measured = self._time(w, unit)
        self._remeasure_noisy(w, unit, measured)
        if self.stop:
            return  # nothing of this unit is written; a rerun does it again
        if self.memory:
            for c in unit:
                m = measured.get(c.id, {})
                if m.get("status") != "ok":
                    continue
                out = w.run_job({"job": "mem", "id": c.id}, timeout_s=self.timeout,
                                on_event=lambda e: self.on_event("worker", e), should_stop=lambda: self.stop)
                if out.killed == "interrupted":
                    return
                mem = next((e for e in out.events if e.get("event") == "mem"), None)
                if mem is not None:
                    m.update({k: v for k, v in mem.items() if k not in ("event", "id")})
                else:
                    m["mem_note"] = self._abnormal(out)["reason"]
        base = next((c for c in unit if c.baseline), None)
        unit_wall = time.perf_counter() - t_unit
        for c in unit:
            m = measured.get(c.id, {"status": "error", "reason": "not measured"})
            m["wall_share_s"] = unit_wall / len(unit)  # this case's share of the unit's wall time
            ref = (c.group, c.pass_) if base is not None else (c.param.get("baseline_group"), c.pass_)
            if base is not None and base.id in measured:
                self.base_times[ref] = (base.id, measured[base.id].get("median_s"))
            if ref in self.base_times:
                m["baseline_id"], base_t = self.base_times[ref]
                if base_t and m.get("median_s"):
                    m["speedup_vs_baseline"] = base_t / m["median_s"]
            rec = self._record(c, m)
            limit = self.suite.stop_series_over_s
            if limit is not None and (rec["status"] != "ok" or rec.get("median_s", 0) > limit):
                stopped.add(series_key(c))

    def _abnormal(self, out: JobOutcome) -> dict[str, Any]:
        if out.killed == "timeout":
            return {"status": "timeout", "reason": f"{out.phase}: one call ran past --case-timeout "
                                                   f"{self.timeout:g} s; worker killed"}
        if out.signal == signal.SIGKILL:
            return {"status": "oom", "reason": f"{out.phase}: worker killed by SIGKILL (likely out of memory)"}
        if out.signal is not None:
            return {"status": "crashed", "reason": f"{out.phase}: worker died of signal {out.signal}"}
        return {"status": "error", "reason": f"{out.phase}: {out.crash or f'worker exit code {out.code}'}"}

    def _record(self, c: Case, m: dict[str, Any]) -> dict[str, Any]:
        roof = getattr(self, "roofs", {}).get(str(c.param.get("dtype", "float32")))
        rec = case_record(c, {"threads": self.threads, **m}, roof, self.summary.run_id)
        self.results.append(rec)
        self.summary.recorded.append(rec)
        self.on_event("case", rec)
        return rec
