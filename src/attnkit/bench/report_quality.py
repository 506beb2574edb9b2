"""The quality part of the benchmark report: accuracy on the small tasks beside forward time and memory.

Reads the ``case`` records of the ``quality`` / ``quality-quick`` suites (see ``attnkit.bench.cases.quality``;
their training figures live in ``params``) and gives: the pick table (per mechanism and width: accuracy on each
task, mean accuracy, forward time and peak memory at that width), the MQAR ordering study (mean, spread and
seeds per mechanism), the mechanisms skipped and why, and two figures (accuracy vs width, accuracy vs train
time). ``quality_markdown`` / ``quality_html`` return the whole section for ``report.md`` / ``report.html``.
"""

from __future__ import annotations

import html
import statistics
from pathlib import Path
from typing import Any

Record = dict[str, Any]

PICK_NOTE = ("accuracy: fraction of scored positions right on a held-out test set, after a fixed step budget "
             "shared by every mechanism (early stop at 99%); fwd ms / peak MiB: the trained model's forward on "
             "8 sequences of the MQAR grid setting at the same width (peak RSS of building it and one forward, "
             "fresh process)")


def quality_rows(cases: list[Record]) -> list[Record]:
    """The ``case`` records that carry a training result (``params.accuracy``), ok or not."""
    return [r for r in cases if "task" in r.get("params", {}) and r.get("impl") == "tinylm"]


def _ok(rows: list[Record]) -> list[Record]:
    return [r for r in rows if r.get("status") == "ok" and r["params"].get("accuracy") is not None]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _task_label(r: Record) -> str:
    p = r["params"]
    if p["task"] == "mqar":
        return f"mqar N={p.get('N')}"
    return p["task"]


def pick_table(cases: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Per (width, mechanism) of the grid: accuracy per task, mean accuracy, forward ms and peak MiB.

    The one table that answers "which mechanism should I pick": quality next to speed at the same width.
    Forward time and memory are the MQAR grid case's (the same model size for every mechanism).
    """
    rows = [r for r in _ok(quality_rows(cases)) if r["params"].get("study") == "grid"]
    tasks = list(dict.fromkeys(_task_label(r) for r in rows))
    header = ["width", "mechanism", *tasks, "mean acc %", "fwd ms", "peak MiB", "train steps/s"]
    by: dict[tuple[int, str], list[Record]] = {}
    for r in rows:
        by.setdefault((r["params"]["width"], r["op"]), []).append(r)
    out = []
    for (width, mech), rs in sorted(by.items(), key=lambda kv: (kv[0][0], -(_mean(
            [x["params"]["accuracy"] for x in kv[1]]) or 0))):
        acc = {_task_label(r): r["params"]["accuracy"] for r in rs}
        speed = next((r for r in rs if r["params"]["task"] == "mqar"), rs[0])
        mem = speed["params"].get("fwd_peak_rss_mb")
        out.append([str(width), mech, *(_pct(acc.get(t)) for t in tasks), _pct(_mean(list(acc.values()))),
                    f"{speed['median_s'] * 1e3:.3g}" if speed.get("median_s") else "—",
                    "—" if mem is None else f"{mem:.0f}",
                    f"{_mean([r['params']['steps_per_s'] for r in rs]):.3g}"])
    return header, out


def ordering_table(cases: list[Record]) -> tuple[list[str], list[list[str]]]:
    """The MQAR ordering study: per mechanism, accuracy mean, standard deviation, min–max and per seed."""
    rows = [r for r in _ok(quality_rows(cases)) if r["params"].get("study") == "ordering"]
    header = ["mechanism", "setting", "seeds", "mean acc %", "std", "min–max %", "per seed %", "steps taken",
              "train s (mean)"]
    by: dict[tuple[str, str], list[Record]] = {}
    for r in rows:
        p = r["params"]
        setting = f"mqar N={p.get('N')}, width {p['width']}, {p['layers']} layers, lr {p['lr']:g}"
        by.setdefault((r["op"], setting), []).append(r)
    out = []
    for (mech, setting), rs in sorted(by.items(), key=lambda kv: -statistics.fmean(
            x["params"]["accuracy"] for x in kv[1])):
        rs = sorted(rs, key=lambda r: r["params"]["seed"])
        accs = [r["params"]["accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        out.append([mech, setting, str(len(rs)), _pct(statistics.fmean(accs)), f"{100 * std:.1f}",
                    f"{_pct(min(accs))}–{_pct(max(accs))}",
                    ", ".join(f"s{r['params']['seed']}: {_pct(a)}" for r, a in zip(rs, accs)),
                    ", ".join(str(r["params"]["steps"]) for r in rs),
                    f"{statistics.fmean(r['params']['train_s'] for r in rs):.0f}"])
    return header, out


def failed_table(cases: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Quality cases that did not finish, with their status and reason."""
    rows = [r for r in quality_rows(cases) if r.get("status") != "ok"]
    return ["mechanism", "case", "status", "reason"], [
        [r["op"], r["group"], r.get("status", "?"), str(r.get("reason", ""))[:200]] for r in rows]


def skipped_table() -> tuple[list[str], list[list[str]]]:
    """Registered mechanisms the quality suites cannot train, and why (read from the registry)."""
    from attnkit.bench.cases.quality import skipped_mechanisms

    return ["mechanism", "why it is skipped"], [[k, v] for k, v in sorted(skipped_mechanisms().items())]


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _panels(rows: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in rows:
        out.setdefault(f"{_task_label(r)} ({r['params'].get('study')})", []).append(r)
    return out


def quality_plots(cases: list[Record], out_dir: str | Path) -> list[tuple[str, str]]:
    """Write ``quality_accuracy_vs_width.png`` and ``quality_accuracy_vs_time.png``; ``[(title, file)]``."""
    rows = [r for r in _ok(quality_rows(cases)) if r["params"].get("study") != "quick"]
    if not rows:
        return []
    out_dir = Path(out_dir)
    panels = _panels(rows)
    mechs = sorted({r["op"] for r in rows})
    color = {m: f"C{i % 10}" for i, m in enumerate(mechs)}
    marker = {m: "osd^v<>p*h"[(i // 10) % 10] for i, m in enumerate(mechs)}
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    figures = []
    for fname, title, xkey, xlabel in (
            ("quality_accuracy_vs_width.png", "Accuracy vs model width (mean over seeds)", "width", "width"),
            ("quality_accuracy_vs_time.png", "Accuracy vs training time (each run)", "train_s", "train s")):
        fig = _figure((5.0 * cols, 3.4 * nrows))
        axes = fig.subplots(nrows, cols, squeeze=False)
        for ax, (name, rs) in zip(axes.flat, panels.items()):
            for m in mechs:
                mine = [r for r in rs if r["op"] == m]
                if not mine:
                    continue
                if xkey == "width":
                    ws = sorted({r["params"]["width"] for r in mine})
                    ys = [100 * statistics.fmean(r["params"]["accuracy"] for r in mine if r["params"]["width"] == w)
                          for w in ws]
                    ax.plot(ws, ys, color=color[m], marker=marker[m], label=m, linewidth=1.2, markersize=4)
                    ax.set_xscale("log", base=2)
                else:
                    ax.scatter([r["params"]["train_s"] for r in mine], [100 * r["params"]["accuracy"] for r in mine],
                               color=color[m], marker=marker[m], label=m, s=16)
                    ax.set_xscale("log")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("accuracy %", fontsize=8)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        for ax in list(axes.flat)[1:len(panels)]:
            h, lab = ax.get_legend_handles_labels()
            seen.update(zip(lab, h))
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(6, len(seen)), fontsize=7)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(seen) // 6), 1, 0.96))
        fig.savefig(out_dir / fname, dpi=110)
        figures.append((title, fname))
    return figures


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def _tables(cases: list[Record]) -> list[tuple[str, str, tuple[list[str], list[list[str]]]]]:
    return [
        ("Quality beside speed: which mechanism to pick (per width)", PICK_NOTE, pick_table(cases)),
        ("MQAR ordering study (Zoology): softmax vs linear attention, several seeds",
         "same step budget and learning rate for every mechanism; std over seeds in accuracy points",
         ordering_table(cases)),
        ("Quality cases that did not finish", "", failed_table(cases)),
        ("Mechanisms the quality suites skip", "only causal sequence mechanisms can be trained as a causal LM",
         skipped_table()),
    ]


def quality_markdown(cases: list[Record], out_dir: str | Path) -> str:
    """The report's quality section in Markdown (writes the two PNGs into ``out_dir``); "" without quality rows."""
    if not quality_rows(cases):
        return ""
    parts = []
    for title, note, (header, rows) in _tables(cases):
        if rows:
            parts += [f"## {title}", "", *([note, ""] if note else []), _md_table(header, rows), ""]
    for title, fname in quality_plots(cases, out_dir):
        parts += [f"![{title}]({fname})", ""]
    return "\n".join(parts)


def quality_html(cases: list[Record], out_dir: str | Path) -> str:
    """The same section as HTML (figures embedded as base64 PNG); "" without quality rows."""
    import base64

    if not quality_rows(cases):
        return ""
    out = []
    for title, note, (header, rows) in _tables(cases):
        if not rows:
            continue
        out.append(f"<h2>{html.escape(title)}</h2>")
        if note:
            out.append(f"<p>{html.escape(note)}</p>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    for title, fname in quality_plots(cases, out_dir):
        data = base64.b64encode((Path(out_dir) / fname).read_bytes()).decode()
        out.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                   f"<figcaption>{html.escape(title)}</figcaption></figure>")
    return "\n".join(out)
