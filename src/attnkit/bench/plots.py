"""Report figures (matplotlib, Agg): time, speedup, efficiency and memory vs N; crossovers marked.

One panel per (op, mask); one line per (implementation, pass): solid forward, dashed
forward+backward. Ops measured at a single size (the registry's mechanisms) get a bar chart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from attnkit.bench.analysis import Crossover, Record, crossovers, series, with_speedups

FIGURES = (
    ("time_vs_n.png", "Time vs N (median, log-log)", "median_s", "seconds", True),
    ("speedup_vs_dense.png", "Speedup vs dense SDPA at the same N", "speedup_vs_baseline", "x dense SDPA", True),
    ("efficiency_vs_roof.png", "Efficiency: useful GFLOP/s as % of the matmul roof", "pct_roof", "% of roof",
     False),
    ("memory_vs_n.png", "Peak RSS vs N (fresh process per case)", "peak_rss_mb", "MiB", True),
)


def _figure(figsize: tuple[float, float]) -> Any:
    """A bare Agg figure: no pyplot (its import costs a second and it keeps global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _style(label: str, labels: list[str]) -> dict[str, Any]:
    impl = label.rsplit(" ", 1)[0]
    impls = sorted({x.rsplit(" ", 1)[0] for x in labels})
    return {"color": f"C{impls.index(impl) % 10}", "linestyle": "--" if label.endswith("fwd+bwd") else "-",
            "marker": "o", "markersize": 3.5, "linewidth": 1.4}


def _series_figure(path: Path, title: str, key: str, ylabel: str, logy: bool,
                   panels: dict[str, dict[str, list[Record]]], cross: list[Crossover]) -> bool:
    names = [p for p, by in panels.items() if any(r.get(key) is not None and not (
        key == "speedup_vs_baseline" and r.get("baseline")) for rs in by.values() for r in rs)]
    if not names:
        return False
    rows, cols = _grid(len(names))
    fig = _figure((5.2 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    all_labels = sorted({lab for by in panels.values() for lab in by})
    for ax, name in zip(axes.flat, names):
        for label, rs in sorted(panels[name].items()):
            pts = [(r["params"]["N"], r[key]) for r in rs if r.get(key) is not None
                   and not (key == "speedup_vs_baseline" and r.get("baseline"))]
            if pts:
                ax.plot(*zip(*pts), label=label, **_style(label, all_labels))
        if key == "speedup_vs_baseline":
            ax.axhline(1.0, color="grey", linewidth=0.8)
        for c in cross:
            if c.panel == name and c.n is not None:
                ax.axvline(c.n, color=_style(c.label, all_labels)["color"], linestyle=":", linewidth=1)
                ax.annotate(f"{c.text}", (c.n, 1.0 if key == "speedup_vs_baseline" else 0.02),
                            xycoords=("data", "data" if key == "speedup_vs_baseline" else "axes fraction"),
                            fontsize=7, rotation=90, va="bottom", ha="right")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _bar_figure(path: Path, records: list[Record]) -> bool:
    """Median time of every ok record without an N (mechanism examples), one bar each."""
    rs = [r for r in records if r.get("status") == "ok" and "N" not in r.get("params", {})]
    if not rs:
        return False
    rs.sort(key=lambda r: (r["op"], r["pass"]))
    fig = _figure((8, 0.28 * len(rs) + 1.2))
    ax = fig.subplots()
    labels = [f"{r['op']} ({r['impl']}, {r['pass']})" for r in rs]
    ax.barh(range(len(rs)), [r["median_s"] * 1e3 for r in rs],
            color=["C0" if r["pass"] == "fwd" else "C1" for r in rs])
    ax.set_yticks(range(len(rs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms (registry example, fp32)")
    ax.set_title("Mechanisms: time of the registry's example")
    ax.grid(True, axis="x", which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def make_plots(records: list[Record], outdir: str | Path) -> list[tuple[str, str]]:
    """Write every figure that has data into ``outdir``; returns ``[(title, filename)]``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    recs = with_speedups(records)
    panels = series(recs)
    cross = crossovers(recs)
    made = []
    for fname, title, key, ylabel, logy in FIGURES:
        if _series_figure(outdir / fname, title, key, ylabel, logy, panels, cross):
            made.append((title, fname))
    if _bar_figure(outdir / "mechanisms.png", recs):
        made.append(("Mechanisms: time of the registry's example", "mechanisms.png"))
    return made
