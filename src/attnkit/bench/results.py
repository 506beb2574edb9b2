"""The results file: one JSON object per line, appended and flushed as each case finishes.

Lines have a ``kind``: ``"run"`` (machine, suite, roof; one per invocation), ``"case"``
(one finished case) and ``"run_end"``. A crash or Ctrl-C loses at most the comparison
in flight; a rerun with the same file skips every case already recorded. Readers
tolerate a torn last line and keep the latest record of a case id.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from attnkit.bench.case import Case
from attnkit.bench.flops import pass_flops

# Statuses: ok | error | oom | timeout | crashed | skipped
FAILED = ("error", "oom", "timeout", "crashed")


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def case_record(case: Case, measured: dict[str, Any], roof: float | None, run_id: str) -> dict[str, Any]:
    """A ``case`` line: the case's identity and params, what was measured, and derived figures."""
    rec: dict[str, Any] = {
        "kind": "case", "id": case.id, "op": case.op, "impl": case.impl, "group": case.group,
        "pass": case.pass_, "suites": sorted(case.suites), "baseline": case.baseline,
        "params": _plain(case.param), "flops_fwd": float(case.flops),
        "flops": pass_flops(case.flops, case.pass_), "run_id": run_id, "time": time.time(),
    }
    rec.update({k: _plain(v) for k, v in measured.items() if k not in ("event", "id", "measured_params")})
    if measured.get("measured_params"):  # measured in setup (a data-dependent density, ...)
        rec["params"] = {**rec["params"], **_plain(measured["measured_params"])}
    rec["flops"] = pass_flops(rec["flops_fwd"], case.pass_)  # the runner's exact figure when it gave one
    med = rec.get("median_s")
    if rec.get("status") == "ok" and med:
        rec["gflops"] = rec["flops"] / med / 1e9 if rec["flops"] else None
        rec["roof_gflops"] = roof
        rec["pct_roof"] = 100.0 * rec["gflops"] / roof if roof and rec["gflops"] else None
    return rec


class ResultsFile:
    """Append-only JSONL store; every write is flushed and fsynced before returning."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, default=str, allow_nan=False) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def done_ids(self, retry_failed: bool = False) -> set[str]:
        """Ids already recorded (skipped by a rerun); ``retry_failed`` leaves failures out."""
        return {i for i, r in latest_cases(load(self.path)).items()
                if not (retry_failed and r.get("status") in FAILED)}


def load(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every well-formed line of a results file (a torn last line is ignored)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def latest_cases(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest ``case`` record per id, in first-seen order."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") == "case":
            out[r["id"]] = r
    return out


def runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``run`` records, oldest first."""
    return [r for r in records if r.get("kind") == "run"]


def baseline_times(records: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[str, float | None]]:
    """``(group, pass) -> (baseline id, median_s)`` of every recorded baseline case."""
    return {(r["group"], r["pass"]): (r["id"], r.get("median_s"))
            for r in latest_cases(records).values() if r.get("baseline")}
