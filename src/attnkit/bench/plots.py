"""Report figures (matplotlib, Agg): time, speedup, efficiency and memory vs N; crossovers marked.

One panel per (op, mask). A panel measured at several N draws one line per (implementation,
pass) on log axes; a panel measured at a single N draws grouped bars on a linear axis (a line
over one N would be a column of dots, and bar lengths only mean something from zero). The
pass is told apart several ways, so it survives greyscale: on lines fwd is a dark shade, a circle
and a solid line, fwd+bwd the light shade of the same hue (the implementation's), a triangle and
a dashed line; bars (whose implementation is on the x axis) are blue for fwd and orange and hatched
for fwd+bwd. Every panel has a legend. Ops measured
without an N (the registry's mechanisms) get a dot plot of their median time on a log axis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from attnkit.bench.analysis import Crossover, Record, crossovers, series, with_speedups

# (file, title, record key, y label, log y for line panels, scale of the value)
FIGURES = (
    ("time_vs_n.png", "Time vs N (median)", "median_s", "ms", True, 1e3),
    ("speedup_vs_dense.png", "Speedup over the comparison's baseline at the same N (> 1: faster)",
     "speedup_vs_baseline", "× faster than baseline", True, 1.0),
    ("efficiency_vs_roof.png", "Efficiency: useful GFLOP/s as % of the matmul roof (capped at 100)", "pct_roof",
     "% of roof", False, 1.0),
    ("memory_vs_n.png", "Peak RSS vs N (fresh process per case)", "peak_rss_mb", "MiB", True, 1.0),
)

PASS_STYLE = {  # per pass: shade index in the hue pair, marker, line style; bar colour and hatch
    "fwd": {"shade": 0, "marker": "o", "linestyle": "-", "bar": "tab:blue", "hatch": ""},
    "fwd+bwd": {"shade": 1, "marker": "^", "linestyle": "--", "bar": "tab:orange", "hatch": "///"},
}


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


def colour(impl: str, pass_: str, impls: list[str]) -> Any:
    """Hue from the implementation, shade from the pass: ``tab20`` holds dark/light pairs of ten hues."""
    from matplotlib import colormaps

    return colormaps["tab20"]((2 * impls.index(impl) + PASS_STYLE[pass_]["shade"]) % 20)


def _line_style(impl: str, pass_: str, impls: list[str]) -> dict[str, Any]:
    st = PASS_STYLE[pass_]
    # the light shade's marker is edged in the dark one, so that a lone fwd+bwd point stays visible
    return {"color": colour(impl, pass_, impls), "linestyle": st["linestyle"], "marker": st["marker"],
            "markersize": 5, "linewidth": 1.5, "markeredgecolor": colour(impl, "fwd", impls),
            "markeredgewidth": 0.8}


def _readable_log_axes(ax: Any, logy: bool) -> None:
    """Plain numbers on the log axes (``1024``, ``40``) instead of powers (``2^10``, ``4×10^1``)."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    class Plain(LogFormatter):  # LogFormatter's choice of which ticks to label, printed as plain numbers
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return f"{x:.3g}"

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if logy:
        ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _points(rs: list[Record], key: str) -> list[Record]:
    """Records that have ``key`` (a baseline's speedup over itself is no information: left out)."""
    return [r for r in rs if r.get(key) is not None and not (key == "speedup_vs_baseline" and r.get("baseline"))]


def single_n(panel: dict[str, list[Record]]) -> bool:
    """A panel whose records were all measured at one N: drawn as bars."""
    return len({r["params"]["N"] for rs in panel.values() for r in rs}) == 1


def _baselines(panel: dict[str, list[Record]]) -> str:
    names = sorted({r["baseline_label"] for rs in panel.values() for r in rs if r.get("baseline_label")})
    return f" (vs {', '.join(names)})" if names else ""


def _line_panel(ax: Any, name: str, panel: dict[str, list[Record]], key: str, logy: bool, scale: float,
                cross: list[Crossover], impls: list[str]) -> None:
    for label, rs in sorted(panel.items()):
        pts = [(r["params"]["N"], r[key] * scale) for r in _points(rs, key)]
        if pts:
            ax.plot(*zip(*pts), label=label, **_line_style(rs[0]["impl"], rs[0]["pass"], impls))
    if key == "speedup_vs_baseline":
        ax.axhline(1.0, color="grey", linewidth=0.8)
    for c in cross:
        if c.panel == name and c.n is not None:
            impl, pass_ = c.label.rsplit(" ", 1)
            ax.axvline(c.n, color=colour(impl, pass_, impls), linestyle=":", linewidth=1)
            ax.annotate(c.text, (c.n, 1.0 if key == "speedup_vs_baseline" else 0.02),
                        xycoords=("data", "data" if key == "speedup_vs_baseline" else "axes fraction"),
                        fontsize=7, rotation=90, va="bottom", ha="right")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    _readable_log_axes(ax, logy)
    ax.set_xlabel("N")
    ax.grid(True, which="both", alpha=0.25)


def _bar_panel(ax: Any, panel: dict[str, list[Record]], key: str, scale: float, impls: list[str]) -> None:
    """Grouped bars on a linear axis from zero: one group per implementation (named on the x axis), one
    bar per pass, told apart by colour and hatch."""
    recs = [r for rs in panel.values() for r in _points(rs, key)]
    names = sorted({r["impl"] for r in recs}, key=impls.index)
    passes = [p for p in PASS_STYLE if any(r["pass"] == p for r in recs)]
    width = 0.8 / max(len(passes), 1)
    for j, pass_ in enumerate(passes):
        xs, ys = [], []
        for i, impl in enumerate(names):
            r = next((r for r in recs if r["impl"] == impl and r["pass"] == pass_), None)
            if r is not None:
                xs.append(i + (j - (len(passes) - 1) / 2) * width)
                ys.append(r[key] * scale)
        st = PASS_STYLE[pass_]
        ax.bar(xs, ys, width=width * 0.95, color=st["bar"], hatch=st["hatch"], edgecolor="black", linewidth=0.5,
               label=pass_)
    if key == "speedup_vs_baseline":
        ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20, ha="right")
    ax.set_ylim(bottom=0)
    n = next(iter(recs))["params"]["N"] if recs else "?"
    ax.set_xlabel(f"implementation (N={n})")
    ax.grid(True, axis="y", alpha=0.25)


def series_figure(title: str, key: str, ylabel: str, logy: bool, scale: float,
                  panels: dict[str, dict[str, list[Record]]], cross: list[Crossover]) -> Any:
    """One figure of :data:`FIGURES`: a panel per (op, mask) that has ``key``; None when none has."""
    names = [p for p, by in panels.items() if any(_points(rs, key) for rs in by.values())]
    if not names:
        return None
    rows, cols = _grid(len(names))
    fig = _figure((5.2 * cols, 3.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    impls = sorted({r["impl"] for by in panels.values() for rs in by.values() for r in rs})
    for ax, name in zip(axes.flat, names):
        if single_n(panels[name]):
            _bar_panel(ax, panels[name], key, scale, impls)
        else:
            _line_panel(ax, name, panels[name], key, logy, scale, cross, impls)
        ax.set_title(name + (_baselines(panels[name]) if key == "speedup_vs_baseline" else ""), fontsize=9)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    return fig


def dot_figure(records: list[Record]) -> Any:
    """Median time of every ok record without an N (mechanism examples): a dot per pass on a log axis,
    one row per (op, impl); a dot plot, since bars on a log axis have no meaningful length."""
    rs = [r for r in records if r.get("status") == "ok" and "N" not in r.get("params", {})]
    if not rs:
        return None
    rows = sorted({(r["op"], r["impl"]) for r in rs})
    fig = _figure((8, 0.3 * len(rows) + 1.4))
    ax = fig.subplots()
    for pass_, st in PASS_STYLE.items():
        pts = [(r["median_s"] * 1e3, rows.index((r["op"], r["impl"]))) for r in rs if r["pass"] == pass_]
        if pts:
            ax.plot(*zip(*pts), linestyle="none", marker=st["marker"], markersize=6, label=pass_,
                    color=st["bar"], markeredgecolor="black", markeredgewidth=0.4)
    ax.set_yticks(range(len(rows)), [f"{op} ({impl})" for op, impl in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xscale("log")
    _readable_log_axes(ax, logy=False)
    ax.set_xlabel("median ms (registry example, fp32; log scale)")
    ax.grid(True, axis="x", which="both", alpha=0.25)
    ax.grid(True, axis="y", alpha=0.15)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.set_title("Mechanisms: time of the registry's example", pad=22)
    fig.tight_layout()
    return fig


def make_plots(records: list[Record], outdir: str | Path) -> list[tuple[str, str]]:
    """Write every figure that has data into ``outdir``; returns ``[(title, filename)]``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    recs = with_speedups(records)
    panels = series(recs)
    cross = crossovers(recs)
    made = []
    for fname, title, key, ylabel, logy, scale in FIGURES:
        fig = series_figure(title, key, ylabel, logy, scale, panels, cross)
        if fig is not None:
            fig.savefig(outdir / fname, dpi=90)
            made.append((title, fname))
    fig = dot_figure(recs)
    if fig is not None:
        fig.savefig(outdir / "mechanisms.png", dpi=90, bbox_inches="tight")  # long row labels: keep them whole
        made.append(("Mechanisms: time of the registry's example", "mechanisms.png"))
    return made
