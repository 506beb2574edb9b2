"""What the reports derive from the records: speedups, series over N, crossover lengths.

*Efficiency length* (CAB, arXiv 2210.07661): the sequence length from which an
implementation beats dense attention. Here it is read off the measurements, not a
fitted model: the speedup vs the comparison's baseline (dense SDPA, or causal SDPA for causal
ops) is interpolated linearly in (log N, log speedup)
between the two measured lengths where it crosses 1.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


def baseline_of(rec: Record, by_group: dict[tuple[str, str], Record]) -> Record | None:
    """The dense-SDPA record ``rec`` is compared with: its group's baseline or ``baseline_group``'s."""
    p = rec.get("params", {})
    for g in (rec.get("group"), p.get("baseline_group")):
        b = by_group.get((g, rec.get("pass")))
        if b is not None:
            return b
    return None


def baseline_label(b: Record) -> str:
    """What a baseline record is, in words: ``"dense SDPA"``, ``"causal softmax SDPA"``, or its impl.

    A causal SDPA baseline (linear attention's, a causal mechanism's) is named as such, so that a
    speedup over it is never read as one over full dense attention.
    """
    impl, p = b.get("impl", "?"), b.get("params", {})
    if not impl.startswith("sdpa"):
        return impl
    causal = ("causal" in impl or p.get("mask") == "causal" or p.get("causal") is True
              or str(p.get("baseline_group", "")).startswith("causal/"))
    return "causal softmax SDPA" if causal else "dense SDPA"


def relative_speed(speedup: float | None, short: bool = False) -> str:
    """``baseline time / this time`` in plain words: ``"2.10× faster"``, ``"1.32× slower"``, ``"same"``.

    Two decimals; within 0.5% of the baseline is ``"same"``.
    """
    if not speedup:
        return ""
    fmt = "{:.1f}" if short else "{:.2f}"
    if speedup >= 1.005:
        return f"{fmt.format(speedup)}× faster"
    if speedup <= 1 / 1.005:
        return f"{fmt.format(1 / speedup)}× slower"
    return "same"


def with_speedups(records: list[Record]) -> list[Record]:
    """Copies of ``records`` with ``speedup_vs_baseline`` (baseline time / this time), ``baseline_id`` and
    ``baseline_label`` filled in wherever a baseline was measured."""
    by_group = {(r["group"], r["pass"]): r for r in records if r.get("baseline") and r.get("status") == "ok"}
    out = []
    for r in records:
        r = dict(r)
        b = baseline_of(r, by_group)
        if b is not None and r.get("median_s") and b.get("median_s"):
            r["speedup_vs_baseline"] = b["median_s"] / r["median_s"]
            r["baseline_id"] = b["id"]
            r["baseline_label"] = baseline_label(b)
        if b is not None and r.get("peak_rss_mb") and b.get("peak_rss_mb"):
            r["mem_saving_vs_baseline"] = b["peak_rss_mb"] / r["peak_rss_mb"]
        out.append(r)
    return out


def series_label(rec: Record) -> str:
    """What a curve over N is called in plots: ``impl`` plus the pass."""
    return f"{rec['impl']} {rec['pass']}"


def panel_key(rec: Record) -> str:
    """Which plot panel a record goes to: its op and group with the ``N=...`` part removed."""
    rest = re.sub(r"(^|/)N=\d+", "", rec["group"]).strip("/")
    return f"{rec['op']}: {rest}" if rest and rest != rec["op"] else rec["op"]


def series(records: list[Record]) -> dict[str, dict[str, list[Record]]]:
    """``panel -> label -> records sorted by N`` for every ok record that has an ``N``."""
    out: dict[str, dict[str, list[Record]]] = {}
    for r in records:
        if r.get("status") != "ok" or "N" not in r.get("params", {}):
            continue
        out.setdefault(panel_key(r), {}).setdefault(series_label(r), []).append(r)
    for panel in out.values():
        for label in panel:
            panel[label].sort(key=lambda r: r["params"]["N"])
    return out


@dataclass(frozen=True)
class Crossover:
    """Where a series starts beating its baseline (dense SDPA, or causal SDPA for causal ops)."""

    panel: str
    label: str
    n: float | None  # interpolated crossing; None when there is none in range
    text: str  # "~2.9K", "< 512 (better at every N)", "> 8192 (worse at every N)"


def _fmt_n(n: float) -> str:
    return f"{n / 1024:.1f}K" if n >= 1024 else f"{n:.0f}"


def crossovers(records: list[Record], key: str = "speedup_vs_baseline") -> list[Crossover]:
    """Efficiency length of every series with at least two N and a ratio vs its baseline.

    Args:
        key: ``"speedup_vs_baseline"`` (time) or ``"mem_saving_vs_baseline"`` (peak memory).
    """
    out = []
    for panel, by_label in series(with_speedups(records)).items():
        for label, rs in by_label.items():
            pts = [(r["params"]["N"], r[key]) for r in rs if r.get(key)]
            if len(pts) < 2 or all(r.get("baseline") for r in rs):
                continue
            cross = None
            for (n0, s0), (n1, s1) in itertools.pairwise(pts):
                if s0 < 1 <= s1:
                    t = (0 - math.log(s0)) / (math.log(s1) - math.log(s0))
                    cross = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
            if cross is not None:
                out.append(Crossover(panel, label, cross, f"~{_fmt_n(cross)}"))
            elif all(s >= 1 for _, s in pts):
                out.append(Crossover(panel, label, None, f"< {pts[0][0]} (better at every N)"))
            elif all(s < 1 for _, s in pts):
                out.append(Crossover(panel, label, None, f"> {pts[-1][0]} (worse at every N)"))
            else:
                out.append(Crossover(panel, label, None, "no single crossing"))
    return out


def summary_rows(records: list[Record]) -> list[Record]:
    """One row per comparison (group, pass): the fastest ok implementation and the runner-up."""
    by: dict[tuple[str, str, str], list[Record]] = {}
    for r in with_speedups(records):
        by.setdefault((r["op"], r["group"], r["pass"]), []).append(r)
    rows = []
    for (op, group, pass_), rs in by.items():
        ok = sorted((r for r in rs if r.get("status") == "ok"), key=lambda r: r["median_s"])
        failed = [r for r in rs if r.get("status") != "ok"]
        row: Record = {"op": op, "group": group, "pass": pass_, "n_impls": len(rs), "failed": failed}
        if ok:
            row["best"] = ok[0]
            row["runner_up"] = ok[1] if len(ok) > 1 else None
        rows.append(row)
    return rows


# implementations that compute every (query, key) pair whatever the mask: the ideal speedup over
# them is ``1 / density``
DENSE_WORK = ("sdpa", "sdpa_dense_mask")


def peer_rows(records: list[Record]) -> list[Record]:
    """Every ok case of a comparison (group, pass) with at least two ok implementations, with
    how many times faster it is than each peer and, where its params give a ``density``, the
    fraction of the ideal speedup ``1 / density`` it reaches over each dense-work peer
    (:data:`DENSE_WORK`; the group's dense baseline counts too when it was measured elsewhere).

    Returns:
        dicts ``{"rec", "faster_than": [(impl, ratio)], "of_ideal": [(impl, fraction)]}``, in the
        records' order.
    """
    recs = with_speedups(records)
    by: dict[tuple[str, str, str], list[Record]] = {}
    for r in recs:
        if r.get("status") == "ok" and r.get("median_s"):
            by.setdefault((r["op"], r["group"], r["pass"]), []).append(r)
    base_ids = {r["id"]: r for r in recs if r.get("baseline")}
    rows = []
    for rs in by.values():
        if len(rs) < 2:
            continue
        for r in rs:
            peers = [p for p in rs if p is not r]
            row: Record = {"rec": r, "faster_than": [(p["impl"], p["median_s"] / r["median_s"]) for p in peers],
                           "of_ideal": []}
            density = r.get("params", {}).get("density")
            if density:
                dense = [(p["impl"], p["median_s"] / r["median_s"]) for p in peers if p["impl"] in DENSE_WORK]
                b = base_ids.get(r.get("baseline_id", ""))
                if b is not None and b not in rs and r.get("speedup_vs_baseline"):
                    dense.append((f"{b['impl']} ({b['group']})", r["speedup_vs_baseline"]))
                row["of_ideal"] = [(name, s * density) for name, s in dense]
            rows.append(row)
    return rows


def scaling_rows(records: list[Record]) -> list[Record]:
    """Per series over N (same op, group without N, impl and pass) with at least two ok lengths:
    the time ratio between each two consecutive measured lengths, beside the length ratio.

    Returns:
        dicts ``{"panel", "label", "steps": [(n0, n1, time ratio)]}``.
    """
    out = []
    for panel, by_label in series(records).items():
        for label, rs in by_label.items():
            steps = [(a["params"]["N"], b["params"]["N"], b["median_s"] / a["median_s"])
                     for a, b in itertools.pairwise(rs) if a.get("median_s") and b.get("median_s")]
            if steps:
                out.append({"panel": panel, "label": label, "steps": steps})
    return out
