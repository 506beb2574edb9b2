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
        rec.update(roof_share(rec["gflops"], roof))
        if rec.get("p20_s"):
            rec["spread"] = rec["p80_s"] / rec["p20_s"]
            rec["noisy"] = rec["spread"] > NOISY_SPREAD
    return rec


# A case whose 80th percentile is more than this many times its 20th is flagged ``noisy`` (and the
# harness measures it once more, keeping the second measurement).
NOISY_SPREAD = 1.5


def roof_share(gflops: float | None, roof: float | None) -> dict[str, Any]:
    """``pct_roof`` of a case: its GFLOP/s as a percentage of the matmul roof, capped at 100.

    The roof is the best of several matmul sizes and repeats, but a case can still pass it (its
    working set fits in cache where the matmul's does not, a neighbour slowed the roof's samples,
    or its FLOP count credits work it skips). Such a figure is capped at 100 and flagged
    ``over_roof``, with the uncapped value kept as ``pct_roof_raw``: it means "the roof is no upper
    bound for this case", not "faster than the machine".
    """
    if not roof or not gflops:
        return {"pct_roof": None}
    raw = 100.0 * gflops / roof
    if raw <= 100.0:
        return {"pct_roof": raw}
    return {"pct_roof": 100.0, "pct_roof_raw": raw, "over_roof": True}


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
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):  # a line of another kind of JSON file is not a record
                out.append(rec)
    return out


def latest_cases(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest ``case`` record per id, in first-seen order."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") == "case" and isinstance(r.get("id"), str):
            out[r["id"]] = r
    return out


def load_results(path: str | os.PathLike[str], who: str) -> list[dict[str, Any]]:
    """The records of a results file (or of a directory's ``results.jsonl``) that must hold some.

    Args:
        who: the command asking, for the messages (``"bench compare"``).

    Raises:
        FileNotFoundError: no such file or directory, or a directory without ``results.jsonl``.
        ValueError: the file holds no benchmark record (empty, or not a results file).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{who}: {path} holds no results.jsonl (write one with "
                                    f"`attnkit bench --out {path}`)")
    elif not p.exists():
        raise FileNotFoundError(f"{who}: no such file or directory: {path}")
    records = load(p)
    if not any(r.get("kind") in ("run", "case") for r in records):
        raise ValueError(f"{who}: {p} holds no benchmark records (expected the JSON lines `attnkit bench` writes)")
    return records


def runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``run`` records, oldest first."""
    return [r for r in records if r.get("kind") == "run"]


def baseline_times(records: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[str, float | None]]:
    """``(group, pass) -> (baseline id, median_s)`` of every recorded baseline case."""
    return {(r["group"], r["pass"]): (r["id"], r.get("median_s"))
            for r in latest_cases(records).values() if r.get("baseline")}
