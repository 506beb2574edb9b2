"""Measure one comparison (cases of one group and pass) in this process.

Protocol, per unit: set up every case (``setup_s``), make each first call (``compile_s``
when it carries a one-off cost such as torch.compile, else ``first_call_s``), check each
against its reference on a slice (untimed), warm up, then time in *rounds*: every round
takes one sample of every case, in an order rotated (and reversed every other round) so
that drift of the machine -- frequency, a neighbour's load -- hits all cases alike.
A sample loops a fast call until it lasts ``min_sample_s``. The median is the figure;
the 20th/80th percentiles are the spread (as LongCA-bench reports).

When a unit alternates cases, a case whose call takes less than ``WARM_EACH_BELOW_S`` makes one
untimed call right before each of its samples. Without it, a fast case's sample starts on memory
left idle while the previous, slow case ran, and on the VMs we measure on, memory idle for ~2 s
is slow to touch again. Measured on Combiner's forward (N=16384), which alternates with a 2.5 s dense
SDPA call: 85 ms in a warm loop, 120-125 ms as the first call after a 2 s sleep (its inputs, its
scratch and its output alike), 360 ms before the tile kernel pooled its scratch. Slow cases are left
as they are: their own run dwarfs the effect, and a second call would double the unit's time.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from attnkit.bench.case import Case
from attnkit.bench.memory import hwm_mb, is_oom, release_free_memory, reset_peak, rss_mb

Emit = Callable[[dict[str, Any]], None]

#: cases whose call is faster than this make one untimed call before each sample of an alternating unit
WARM_EACH_BELOW_S = 1.0


def sync() -> None:
    """Wait for queued GPU work so wall time covers it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _failure(case: Case, exc: BaseException, phase: str) -> dict[str, Any]:
    status = "oom" if is_oom(exc) else "error"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return {"event": "result", "id": case.id, "status": status,
            "reason": f"{phase}: {type(exc).__name__}: {str(exc)[:300]}{where}"}


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _timed(run: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    sync()
    return (time.perf_counter() - t0) / n


def measure_unit(cases: list[Case], opts: dict[str, Any], emit: Emit) -> None:
    """Time ``cases`` (one group, one pass) interleaved; emit one ``result`` event per case.

    Args:
        cases: the cases of one comparison.
        opts: ``repeat, min_repeat, warmup_s, min_sample_s, unit_budget_s, case_timeout_s``.
        emit: receives ``{"event": "begin", "id", "phase"}`` before every call (the parent's
            watchdog and live display use it) and ``{"event": "result", ...}`` per case.
    """
    gc.collect()
    live: dict[str, dict[str, Any]] = {}
    for c in cases:
        emit({"event": "begin", "id": c.id, "phase": "setup"})
        t0 = time.perf_counter()
        try:
            runner = c.setup()
        except Exception as exc:
            emit(_failure(c, exc, "setup"))
            continue
        live[c.id] = {"case": c, "runner": runner, "setup_s": time.perf_counter() - t0,
                      "oneoff": dict(runner.oneoff), "spent": time.perf_counter() - t0}
        if runner.flops is not None:
            live[c.id]["flops_fwd"] = float(runner.flops)
        if runner.params:
            live[c.id]["measured_params"] = dict(runner.params)
        if runner.check_vs:
            live[c.id]["error_vs"] = runner.check_vs

    for cid, st in list(live.items()):
        run = st["runner"].run
        emit({"event": "begin", "id": cid, "phase": "compile" if st["runner"].first_call_is_oneoff else "first"})
        try:
            dt = _timed(run, 1)
        except Exception as exc:
            emit(_failure(st["case"], exc, "first call"))
            del live[cid]
            continue
        st["spent"] += dt
        st["compile_s" if st["runner"].first_call_is_oneoff else "first_call_s"] = dt
        st["est"] = None if st["runner"].first_call_is_oneoff else dt
        if st["runner"].check is not None:
            emit({"event": "begin", "id": cid, "phase": "check"})
            try:
                st["max_abs_err"], st["rel_rmse"] = (float(x) for x in st["runner"].check())
            except Exception as exc:
                st["check_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

    for cid, st in list(live.items()):  # warm-up; also the per-call estimate
        run = st["runner"].run
        emit({"event": "begin", "id": cid, "phase": "warmup"})
        # a plain first call already warmed up: only calls cheaper than warmup_s get more
        end = time.perf_counter() + opts["warmup_s"] - (st["est"] or 0.0)
        try:
            while st["est"] is None or time.perf_counter() < end:
                dt = _timed(run, 1)
                st["spent"] += dt
                st["est"] = dt if st["est"] is None else min(st["est"], dt)
        except Exception as exc:
            emit(_failure(st["case"], exc, "warm-up"))
            del live[cid]

    timeout = opts["case_timeout_s"]
    for cid, st in list(live.items()):
        need = st["est"] * opts["min_repeat"]
        if st["spent"] + need > timeout:
            emit({"event": "result", "id": cid, "status": "timeout",
                  "reason": f"one call takes {st['est']:.2f} s; {opts['min_repeat']} samples would pass "
                            f"--case-timeout {timeout:g} s", "setup_s": st["setup_s"],
                  "first_call_s": st.get("first_call_s"), "compile_s": st.get("compile_s")})
            del live[cid]
        else:
            st["inner"] = max(1, math.ceil(opts["min_sample_s"] / max(st["est"], 1e-9)))
            st["samples"] = []

    round_cost = sum(st["inner"] * st["est"] for st in live.values())
    rounds = min(opts["repeat"], max(opts["min_repeat"], int(opts["unit_budget_s"] / max(round_cost, 1e-9))))
    order = list(live)
    for r in range(rounds):
        k = r % max(len(order), 1)
        this = order[k:] + order[:k]
        for cid in reversed(this) if r % 2 else this:
            st = live.get(cid)
            if st is None:
                continue
            emit({"event": "begin", "id": cid, "phase": f"sample {r + 1}/{rounds}"})
            try:
                if len(order) > 1 and st["est"] < WARM_EACH_BELOW_S:
                    st["runner"].run()  # untimed: the sample starts warm (module docstring)
                st["samples"].append(_timed(st["runner"].run, st["inner"]))
            except Exception as exc:
                emit(_failure(st["case"], exc, f"sample {r + 1}"))
                del live[cid]

    for cid, st in live.items():
        xs = st["samples"]
        rec = {"event": "result", "id": cid, "status": "ok", "median_s": statistics.median(xs),
               "p20_s": _quantile(xs, 0.2), "p80_s": _quantile(xs, 0.8), "min_s": min(xs),
               "samples": len(xs), "inner_loops": st["inner"], "setup_s": st["setup_s"]}
        for key in ("compile_s", "first_call_s", "max_abs_err", "rel_rmse", "check_error", "error_vs", "flops_fwd",
                    "measured_params"):
            if key in st:
                rec[key] = st[key]
        if st["oneoff"]:
            rec["oneoff"] = st["oneoff"]
        emit(rec)


def measure_memory(case: Case, emit: Emit) -> None:
    """Peak RSS of setup + one pass in this (fresh) process; emits one ``mem`` event.

    See :mod:`attnkit.bench.memory` for what the figure means.
    """
    release_free_memory()
    if not reset_peak():
        emit({"event": "mem", "id": case.id, "peak_rss_mb": None, "mem_note": "no /proc/self/clear_refs"})
        return
    base = rss_mb()
    emit({"event": "begin", "id": case.id, "phase": "memory"})
    try:
        runner = case.setup()
        if runner.first_call_is_oneoff:
            after_setup = rss_mb()
            runner.run()
            sync()
            release_free_memory()
            reset_peak()
            r0 = rss_mb()
            runner.run()
            sync()
            peak = (after_setup - base) + (hwm_mb() - r0)
        else:
            runner.run()
            sync()
            peak = hwm_mb() - base
    except Exception as exc:
        emit({"event": "mem", "id": case.id, "peak_rss_mb": None,
              "mem_note": ("oom: " if is_oom(exc) else "error: ") + f"{type(exc).__name__}: {str(exc)[:200]}"})
        return
    rec: dict[str, Any] = {"event": "mem", "id": case.id, "peak_rss_mb": max(peak, 0.0)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rec["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    emit(rec)
