"""The quality part of the benchmark report: accuracy on the small tasks beside forward time and memory.

Reads the ``case`` records of the ``quality`` / ``quality-quick`` suites (see ``attnkit.bench.cases.quality``;
their training figures live in ``params``) and gives: the pick table (per mechanism and width: accuracy on each
task, mean accuracy, forward time and peak memory at that width), the MQAR ordering study (mean, spread and
seeds per mechanism), the mechanisms skipped and why, and two figures (accuracy vs width, accuracy vs train
time). :func:`quality_sections` and :func:`quality_plots` are registered in ``attnkit.bench.report``'s
``SECTIONS`` and ``FIGURE_MAKERS``, so ``report.md`` and ``report.html`` both show them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

Record = dict[str, Any]

PICK_NOTE = ("accuracy: fraction of scored positions right on a held-out test set, after a step budget and a "
             "training-time cap shared by every mechanism (early stop at 99% on a probe batch; 'steps taken' below "
             "the budget: the early stop or the time cap); mean acc: over the tasks run at that width; fwd ms / "
             "peak MiB: the trained model's forward on 8 sequences of its MQAR setting at the same width (peak "
             "RSS of building it and one forward, fresh process)")


def quality_rows(cases: list[Record]) -> list[Record]:
    """The ``case`` records that carry a training result (``params.accuracy``), ok or not."""
    return [r for r in cases if "task" in r.get("params", {}) and r.get("impl") == "tinylm"]


def _ok(rows: list[Record]) -> list[Record]:
    return [r for r in rows if r.get("status") == "ok" and r["params"].get("accuracy") is not None]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _task_label(r: Record) -> str:
    p = r["params"]
    if p["task"] == "mqar":
        return f"mqar N={p.get('N')}"
    return p["task"]


def pick_table(cases: list[Record], study: str = "grid") -> tuple[list[str], list[list[str]]]:
    """Per (width, mechanism) of ``study`` (``"grid"`` or ``"quick"``): accuracy per task, mean accuracy,
    forward ms and peak MiB.

    The one table that answers "which mechanism should I pick": quality next to speed at the same width.
    Forward time and memory are the MQAR grid case's (the same model size for every mechanism).
    """
    rows = [r for r in _ok(quality_rows(cases)) if r["params"].get("study") == study]
    tasks = list(dict.fromkeys(_task_label(r) for r in rows))
    header = ["width", "mechanism", *tasks, "mean acc %", "fwd ms", "peak MiB", "train steps/s",
              "steps taken / budget (first task)", "flags"]
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
                    _num(_mean([r["params"]["steps_per_s"] for r in rs if r["params"].get("steps_per_s")])),
                    f"{speed['params'].get('steps')} / {speed['params'].get('step_budget')}",
                    "; ".join(f"{_task_label(r)}: diverged ({', '.join(r['params']['nonfinite'])} not finite)"
                              for r in rs if r["params"].get("nonfinite"))])
    return header, out


def ordering_table(cases: list[Record]) -> tuple[list[str], list[list[str]]]:
    """The MQAR ordering study: per mechanism, accuracy mean, standard deviation, min–max and per seed."""
    rows = [r for r in _ok(quality_rows(cases)) if r["params"].get("study") == "ordering"]
    header = ["mechanism", "setting", "seeds", "mean acc %", "std", "min–max %", "per seed %", "steps taken",
              "train s (mean)"]
    by: dict[tuple[str, str], list[Record]] = {}
    for r in rows:
        p = r["params"]
        setting = (f"mqar N={p.get('N')}, width {p['width']}, {p['layers']} layers, lr {p['lr']:g}, "
                   f"budget {p.get('step_budget')} steps")
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
    done = _ok(quality_rows(cases))
    # the full suite's studies; a quick-only results file plots its quick rows
    rows = [r for r in done if r["params"].get("study") != "quick"] or done
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
                    ax.set_xticks(ws, [str(w) for w in ws])  # the widths themselves, not powers of two
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


def _verdict(cases: list[Record]) -> tuple[str, ...]:
    """Notes under the ordering table: the acceptance checks, read from the numbers."""
    rows = [r for r in _ok(quality_rows(cases)) if r["params"].get("study") == "ordering"]
    acc: dict[str, list[float]] = {}
    for r in rows:
        acc.setdefault(r["op"], []).append(r["params"]["accuracy"])
    notes = ["same step budget, learning rate and data for every mechanism (no per-mechanism tuning); std: "
             "sample standard deviation over seeds, in accuracy points; steps taken < budget means the early "
             "stop at 99% on a held-out probe batch fired"]
    if "mha" in acc:
        m = acc["mha"]
        notes.append(f"softmax attention (mha): mean {_pct(statistics.fmean(m))}%, min {_pct(min(m))}% over "
                     f"{len(m)} seeds -> {'meets' if min(m) >= 0.9 else 'misses'} the 90% mark on every seed")
        for other in sorted(acc):
            if other != "mha":
                o = acc[other]
                gap = statistics.fmean(m) - statistics.fmean(o)
                notes.append(f"{other}: mean {_pct(statistics.fmean(o))}%, {100 * gap:.1f} points below mha "
                             f"(its best seed {_pct(max(o))}% vs mha's worst {_pct(min(m))}%)")
    return tuple(notes)


def quality_sections(ctx: dict[str, Any]) -> list[Any]:
    """The report's quality tables (a :data:`attnkit.bench.report.SECTIONS` entry); none without quality rows.

    The pick table per study (``grid`` of ``quality``, ``quick`` of ``quality-quick``), the MQAR ordering study
    with the acceptance checks in its notes, the quality cases that failed, and the mechanisms skipped and why.
    """
    from attnkit.bench.report import Table

    cases = ctx["cases"]
    if not quality_rows(cases):
        return []
    out = []
    for study, title in (("grid", "Quality beside speed: which mechanism to pick (suite quality, per width)"),
                         ("quick", "Quality beside speed, quick check (suite quality-quick: short budgets)")):
        header, rows = pick_table(cases, study)
        if rows:
            out.append(Table(title, tuple(header), rows, notes=(PICK_NOTE,)))
    header, rows = ordering_table(cases)
    if rows:
        out.append(Table("MQAR ordering study (Zoology): softmax vs linear attention, several seeds", tuple(header),
                         rows, notes=_verdict(cases)))
    header, rows = failed_table(cases)
    if rows:
        out.append(Table("Quality cases that did not finish", tuple(header), rows, classes=("bad",) * len(rows)))
    header, rows = skipped_table()
    out.append(Table("Mechanisms the quality suites skip", tuple(header), rows,
                     notes=("only mechanisms with the causal-self pattern on token sequences can be trained as a "
                            "causal LM",)))
    return out
