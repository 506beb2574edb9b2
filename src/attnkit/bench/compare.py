"""``attnkit bench compare OLD NEW``: per-case time ratios, regressions flagged.

Cases are matched by id (op/group/impl/pass). The ratio is ``new median / old median``:
above ``1 + threshold`` is a regression, below ``1 - threshold`` an improvement. A case
that was ok and now fails is a regression too. Medians of different machines are not
comparable; the machine of each file is shown so a reader can tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attnkit.bench.results import latest_cases, load_results, runs


@dataclass(frozen=True)
class Change:
    """One case present in both files."""

    id: str
    old_s: float | None
    new_s: float | None
    ratio: float | None  # new / old
    flag: str  # "regression", "improvement", "" or "failed: <status>", "fixed"


def compare(old: str | Path, new: str | Path, threshold: float = 0.10) -> tuple[list[Change], dict[str, list[str]]]:
    """Compare two results files (or directories holding ``results.jsonl``).

    Returns:
        ``(changes, extra)``: a :class:`Change` per common case (worst ratio first) and
        ``{"only_old": [...], "only_new": [...], "machines": [old, new]}``.

    Raises:
        FileNotFoundError: a path that does not exist (or a directory without ``results.jsonl``).
        ValueError: a file that holds no benchmark record.
    """
    a_recs, b_recs = load_results(old, "bench compare"), load_results(new, "bench compare")
    a, b = latest_cases(a_recs), latest_cases(b_recs)
    out = []
    for cid in a.keys() & b.keys():
        ra, rb = a[cid], b[cid]
        ta = ra.get("median_s") if ra.get("status") == "ok" else None
        tb = rb.get("median_s") if rb.get("status") == "ok" else None
        ratio = tb / ta if ta and tb else None
        if ta is not None and tb is None:
            flag = f"failed: {rb.get('status')}"
        elif ta is None and tb is not None:
            flag = "fixed"
        elif ratio is not None and ratio > 1 + threshold:
            flag = "regression"
        elif ratio is not None and ratio < 1 - threshold:
            flag = "improvement"
        else:
            flag = ""
        out.append(Change(cid, ta, tb, ratio, flag))
    out.sort(key=lambda c: (not c.flag.startswith("failed"), -(c.ratio or 0)))

    def machine(recs: list[dict]) -> str:
        r = runs(recs)
        m = r[-1].get("machine", {}) if r else {}
        return f"{m.get('cpu', '?')} / torch {m.get('torch', '?')} / {m.get('threads', '?')} threads"

    extra = {"only_old": sorted(a.keys() - b.keys()), "only_new": sorted(b.keys() - a.keys()),
             "machines": [machine(a_recs), machine(b_recs)]}
    return out, extra


def regressions(changes: list[Change]) -> list[Change]:
    """The changes a CI should fail on."""
    return [c for c in changes if c.flag == "regression" or c.flag.startswith("failed")]
