"""Reports from a results file: ``report.md``, a self-contained ``report.html`` and its PNGs.

Both read only ``results.jsonl`` (the latest record per case), so a report can be rebuilt
at any time, for a finished, interrupted or resumed run alike.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.bench.analysis import (
    Record,
    crossovers,
    peer_rows,
    relative_speed,
    scaling_rows,
    summary_rows,
    with_speedups,
)
from attnkit.bench.plots import make_plots
from attnkit.bench.report_quality import quality_plots, quality_sections
from attnkit.bench.results import NOISY_SPREAD, latest_cases, load, load_results, runs

MEMORY_NOTE = ("peak memory: resident growth of a fresh process forked from an idle worker while it builds "
               "the inputs and runs one pass (Linux VmHWM after clear_refs); compile residue excluded")


def _num(x: Any, fmt: str = "{:.3g}") -> str:
    return "" if x is None else fmt.format(x)


def ms(r: Record) -> str:
    if r.get("median_s") is None:
        return ""
    return f"{r['median_s'] * 1e3:.3g}"


def spread(r: Record) -> str:
    if r.get("p20_s") is None:
        return ""
    return f"{r['p20_s'] * 1e3:.3g}–{r['p80_s'] * 1e3:.3g}"


def oneoffs(r: Record) -> str:
    parts = []
    for key, label in (("compile_s", "compile"), ("setup_s", "setup")):
        if r.get(key) is not None and (key == "compile_s" or r[key] >= 0.05):
            parts.append(f"{label} {r[key]:.2g}s")
    for k, v in (r.get("oneoff") or {}).items():
        parts.append(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2g}s")
    return ", ".join(parts)


def status(r: Record) -> str:
    s = r.get("status", "?")
    return s if s == "ok" else f"{s}: {r.get('reason', '')}"[:160]


def roof_cell(r: Record) -> str:
    """``% roof``, capped at 100; ``100*`` marks a case above the measured roof (see the report's notes)."""
    if r.get("pct_roof") is None:
        return ""
    return "100*" if r.get("over_roof") else f"{r['pct_roof']:.0f}"


def versus(r: Record) -> str:
    """This case against its comparison's baseline, in words: ``2.10× faster than dense SDPA``."""
    if r.get("baseline") and r.get("status") == "ok":
        return "baseline"
    rel = relative_speed(r.get("speedup_vs_baseline"))
    if not rel:
        return ""
    label = r.get("baseline_label", "the baseline")
    return f"{rel} than {label}" if rel != "same" else f"same as {label}"


def flags(r: Record) -> str:
    """Warnings about a measurement: noisy, re-measured, above the roof."""
    out = []
    first = r.get("first_measurement")
    if r.get("noisy") or (r.get("p20_s") and r["p80_s"] > NOISY_SPREAD * r["p20_s"]):
        out.append(f"noisy: p80/p20 ×{r['p80_s'] / r['p20_s']:.2f}" + (" after re-measuring" if first else ""))
    if first and first.get("p20_s"):
        out.append(f"re-measured (first: median {first['median_s'] * 1e3:.3g} ms, "
                   f"p80/p20 ×{first['p80_s'] / first['p20_s']:.2f})")
    if r.get("remeasure_failed"):
        out.append(f"re-measure failed ({r['remeasure_failed'][:60]})")
    if r.get("over_roof"):
        out.append(f"above roof: {r['pct_roof_raw']:.0f}% uncapped")
    if r.get("check_error"):
        out.append(f"check failed: {r['check_error'][:60]}")
    return "; ".join(out)


CASE_COLUMNS = (
    ("group", lambda r: r["group"]), ("impl", lambda r: r["impl"]), ("pass", lambda r: r["pass"]),
    ("median ms", ms), ("p20–p80 ms", spread), ("GFLOP/s", lambda r: _num(r.get("gflops"), "{:.1f}")),
    ("% roof", roof_cell), ("vs baseline", versus),
    ("peak MiB", lambda r: _num(r.get("peak_rss_mb"), "{:.0f}")),
    ("max abs err", lambda r: _num(r.get("max_abs_err"), "{:.1e}")),
    ("rel err", lambda r: _num(r.get("rel_rmse"), "{:.1e}")),
    ("one-off", oneoffs), ("flags", flags), ("status", status),
)

SUMMARY_COLUMNS = ("comparison", "pass", "fastest", "median ms", "GFLOP/s", "% roof", "vs baseline",
                   "next best", "max abs err", "flags", "failed")


def summary_cells(row: Record) -> list[str]:
    """The cells of one summary row (shared by the terminal, markdown and HTML tables)."""
    b, nxt = row.get("best"), row.get("runner_up")
    failed = ", ".join(f"{f['impl']} ({f['status']})" for f in row["failed"])
    if b is None:
        return [f"{row['op']}/{row['group']}", row["pass"], "—", "", "", "", "", "", "", "", failed]
    return [f"{row['op']}/{row['group']}", row["pass"], b["impl"], ms(b), _num(b.get("gflops"), "{:.1f}"),
            roof_cell(b), versus(b), f"{nxt['impl']} ×{nxt['median_s'] / b['median_s']:.2f} slower" if nxt else "",
            _num(b.get("max_abs_err"), "{:.1e}"), flags(b), failed]


CROSS_COLUMNS = ("panel", "series", "time crossover N", "memory crossover N")

PEER_COLUMNS = ("comparison", "pass", "impl", "median ms", "× faster than (peer time / this time)",
                "fraction of ideal 1/density (vs dense-work peer)")


def peer_table(cases: list[Record]) -> list[list[str]]:
    """Rows of the peer-ratio table: each implementation against the others of its comparison."""
    rows = []
    for row in peer_rows(cases):
        r = row["rec"]
        d = r.get("params", {}).get("density")
        ideal = ", ".join(f"{100 * f:.0f}% vs {name}" for name, f in row["of_ideal"])
        rows.append([f"{r['op']}/{r['group']}", r["pass"], r["impl"], ms(r),
                     ", ".join(f"{name} {x:.2f}" for name, x in row["faster_than"]),
                     f"{ideal} (ideal {1 / d:.2f}×)" if ideal and d else ""])
    return rows


SCALING_COLUMNS = ("panel", "series", "time ratio between consecutive N (length ratio)")


def scaling_table(cases: list[Record]) -> list[list[str]]:
    """Rows of the scaling table: how each series' time grows from one measured N to the next."""
    return [[row["panel"], row["label"], ", ".join(f"{n0}→{n1}: ×{t:.2f} (N ×{n1 / n0:g})"
                                                   for n0, n1, t in row["steps"])]
            for row in scaling_rows(cases)]


def error_note(rs: list[Record]) -> str:
    """What the error columns of a section compare with (the cases' ``error_vs``), if recorded."""
    kinds = list(dict.fromkeys(r["error_vs"] for r in rs if r.get("error_vs")))
    return f"max abs err / rel err vs: {'; '.join(kinds)}" if kinds else ""


def efficiency_lengths(cases: list[Record]) -> list[list[str]]:
    """Rows of (panel, series, time crossover, memory crossover) -- CAB's efficiency lengths."""
    mem = {(c.panel, c.label): c.text for c in crossovers(cases, "mem_saving_vs_baseline")}
    return [[c.panel, c.label, c.text, mem.get((c.panel, c.label), "")] for c in crossovers(cases)]


def time_by_op(cases: list[Record]) -> list[list[str]]:
    """Wall time per op, largest first: what to trim when a suite outgrows its budget."""
    tot: dict[str, list[float]] = {}
    for r in cases:
        t = tot.setdefault(r["op"], [0, 0.0])
        t[0] += 1
        t[1] += r.get("wall_share_s") or 0.0
    return [[op, str(int(n)), f"{s:.0f}"] for op, (n, s) in sorted(tot.items(), key=lambda kv: -kv[1][1])]


def suite_ops(ctx: dict[str, Any]) -> list[tuple[str, str, list[Record]]]:
    """(suite, op, records) per suite that was run and op that it measured."""
    suites = list(dict.fromkeys(r.get("suite", "?") for r in ctx["runs"])) or ["?"]
    out = []
    for suite in suites:
        in_suite = [r for r in ctx["cases"] if suite in r.get("suites", [suite])]
        for op in dict.fromkeys(r["op"] for r in in_suite):
            out.append((suite, op, [r for r in in_suite if r["op"] == op]))
    return out


@dataclass(frozen=True)
class Table:
    """One titled table of a report; the markdown and HTML writers render the same list of them.

    Attributes:
        title: the section heading.
        header: column names.
        rows: cells, as text.
        notes: lines shown between the heading and the table.
        classes: per row, an HTML class (``"bad"`` failed, ``"base"`` baseline, ``""``); may be empty.
    """

    title: str
    header: tuple[str, ...]
    rows: list[list[str]]
    notes: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()


# A section turns the report's context into tables (none when it has nothing to say): ``ctx["cases"]`` the
# latest record per case (speedups filled in), ``ctx["records"]`` every line of results.jsonl (other kinds of
# lines included), ``ctx["runs"]`` the run lines. SECTIONS is the report's order, for the markdown and the
# HTML alike; a new section is one function inserted here.
Section = Callable[[dict[str, Any]], list[Table]]


def summary_section(ctx: dict[str, Any]) -> list[Table]:
    rows = summary_rows(ctx["cases"])
    return [Table("Summary (fastest implementation per comparison)", SUMMARY_COLUMNS,
                  [summary_cells(r) for r in rows], classes=tuple("bad" if r["failed"] else "" for r in rows))]


def efficiency_section(ctx: dict[str, Any]) -> list[Table]:
    cross = efficiency_lengths(ctx["cases"])
    return [Table("Efficiency length (N from which an implementation beats its baseline)", CROSS_COLUMNS,
                  cross)] if cross else []


def peer_section(ctx: dict[str, Any]) -> list[Table]:
    peers = peer_table(ctx["cases"])
    return [Table("Peer ratios (each implementation vs the others in its comparison)", PEER_COLUMNS,
                  peers)] if peers else []


def scaling_section(ctx: dict[str, Any]) -> list[Table]:
    scaling = scaling_table(ctx["cases"])
    return [Table("Scaling over N (time ratio between consecutive measured lengths)", SCALING_COLUMNS,
                  scaling)] if scaling else []


def time_section(ctx: dict[str, Any]) -> list[Table]:
    return [Table("Where the time went (wall time per op, setup and memory runs included)",
                  ("op", "cases", "wall s"), time_by_op(ctx["cases"]))]


def case_sections(ctx: dict[str, Any]) -> list[Table]:
    out = []
    for suite, op, rs in suite_ops(ctx):
        note = error_note(rs)
        out.append(Table(f"{op} — suite `{suite}`", tuple(c for c, _ in CASE_COLUMNS),
                         [[f(r) for _, f in CASE_COLUMNS] for r in rs], notes=(note,) if note else (),
                         classes=tuple("bad" if r["status"] != "ok" else "base" if r.get("baseline") else ""
                                       for r in rs)))
    return out


SECTIONS: list[Section] = [summary_section, quality_sections, efficiency_section, peer_section, scaling_section,
                           time_section, case_sections]


# Figures: each maker writes its PNGs into the output folder and returns ``[(title, file name)]``; both reports
# show them after the summary, in this order.
FigureMaker = Callable[[list[Record], Path], list[tuple[str, str]]]
FIGURE_MAKERS: list[FigureMaker] = [make_plots, quality_plots]


def tables(ctx: dict[str, Any]) -> list[Table]:
    """Every table of the report, in :data:`SECTIONS` order."""
    return [t for section in SECTIONS for t in section(ctx)]


def _md_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def _context(path: Path) -> dict[str, Any]:
    records = load(path)
    latest = list(latest_cases(records).values())
    rs = runs(records)
    last = rs[-1] if rs else {}
    ends = [r for r in records if r.get("kind") == "run_end"]
    not_installed: dict[str, int] = {}
    provider_errors: dict[str, str] = {}
    for r in rs:
        not_installed.update(r.get("not_installed") or {})
        provider_errors.update(r.get("provider_errors") or {})
    return {"cases": with_speedups(latest), "records": records, "run": last, "runs": rs,
            "wall_s": sum(e.get("wall_s", 0) for e in ends),
            "interrupted": bool(ends and ends[-1].get("interrupted")), "not_installed": not_installed,
            "provider_errors": provider_errors}


def _native_line(nat: dict[str, Any] | None) -> str:
    if not nat:
        return "compiled CPU kernels (attnkit.kernels.native): not recorded"
    return (f"compiled CPU kernels (attnkit.kernels.native, linear-attention chunk core): {nat['status']} "
            f"(build or cache load {nat['build_s']:.1f} s, one-off, before the first case)")


def _header_lines(ctx: dict[str, Any]) -> list[str]:
    run, m = ctx["run"], ctx["run"].get("machine", {})
    roofs = ", ".join(f"{k} {v:.1f}" for k, v in (run.get("roof_gflops") or {}).items() if v)
    by_size = next((b for b in (run.get("roof_by_size") or {}).values() if b), {})
    sizes = "/".join(str(n) for n in by_size)
    when = _dt.datetime.fromtimestamp(run.get("time", 0)).strftime("%Y-%m-%d %H:%M") if run else "?"
    ok = sum(r["status"] == "ok" for r in ctx["cases"])
    lines = [
        f"suite `{run.get('suite', '?')}`, last run {when}; {len(ctx['cases'])} cases ({ok} ok), "
        f"{len(ctx['runs'])} invocation(s), {ctx['wall_s']:.0f} s in total"
        + (" — **interrupted** (rerun with the same --out to finish)" if ctx["interrupted"] else ""),
        f"machine: {m.get('cpu', '?')}, {m.get('physical_cores', '?')} cores / {m.get('logical_cores', '?')} "
        f"threads, {m.get('ram_gb', '?')} GiB; torch {m.get('torch', '?')}, python {m.get('python', '?')}, "
        f"{m.get('threads', '?')} torch threads",
        f"matmul roof (GFLOP/s, best sample of square matmuls of {sizes or 'several sizes'}, repeated, in this run, "
        f"same threads): {roofs or 'n/a'}",
        "% roof: useful GFLOP/s over the roof, capped at 100; `100*` marks a case that ran above the measured "
        "roof (uncapped figure in its flags): the roof is then no upper bound for that case (its working set "
        "fits in cache where the matmul's does not, or a neighbour slowed the roof's samples), not a case "
        "faster than the machine",
        _native_line(run.get("native_kernels")),
        "FLOPs: useful only — 4·area·H·D forward over the mask's exact allowed pairs, fwd+bwd = 3.5× "
        "(LongCA-bench); mechanisms: their registered flops()",
        "timing: warm-up, then interleaved rounds within each comparison; median with 20th–80th percentiles; "
        "one-off costs (setup, mask/plan build, compile) apart",
        "vs baseline: the comparison's baseline time over this case's time, in words (\"2.10× faster than "
        "dense SDPA\"); dense SDPA = SDPA without a mask at the same N, H, D, dtype and pass (the `full/N=…` "
        "comparison: faster than it means faster than simply ignoring the mask's sparsity); causal softmax "
        "SDPA = SDPA with is_causal=True (the baseline of linear attention and of causal mechanisms)",
        f"noisy: when a case's p80/p20 exceeds {NOISY_SPREAD:g}, its comparison is timed once more in a fresh "
        "process (all its cases, interleaved again); the second measurement is kept and the first shown in the "
        "flags (`re-measured`); `noisy` stays on a case whose second measurement is noisy too",
        MEMORY_NOTE,
        "error: vs an fp64 reference on a slice (64 query rows, all heads) unless a section says otherwise; "
        "mechanisms: vs their registered reference (spec.reference) in fp64",
        "peer ratios: within one comparison, each implementation's speedup over each other one; fraction "
        "of ideal = speedup over an implementation that computes every pair (sdpa, sdpa_dense_mask) × density",
    ]
    if ctx["not_installed"]:
        lines.append("not installed: " + ", ".join(f"{k} ({v} cases skipped)" for k, v in ctx["not_installed"].items()))
    for name, err in ctx["provider_errors"].items():
        lines.append(f"provider failed: {name}: {err}")
    return lines


def write_markdown(ctx: dict[str, Any], path: Path, figures: list[tuple[str, str]]) -> None:
    parts = ["# attnkit benchmark", "", *(f"- {line}" for line in _header_lines(ctx)), ""]
    for i, t in enumerate(tables(ctx)):
        parts += [f"## {t.title}", "", *(x for note in t.notes for x in (note, "")), _md_table(t.header, t.rows), ""]
        if i == 0 and figures:  # the figures right after the summary, as in the HTML
            parts += ["## Figures", ""] + [f"![{title}]({f})" for title, f in figures] + [""]
    path.write_text("\n".join(parts))


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;
font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:nth-child(-n+3),th{text-align:left}th{background:#f0f0f0}tr.bad td{background:#fde8e8}
tr.base td{background:#eef5ff}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}ul{font-size:13px}"""


def _html_table(header: list[str] | tuple[str, ...], rows: list[tuple[list[str], str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells, cls in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(ctx: dict[str, Any], path: Path, figures: list[tuple[str, str]]) -> None:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>attnkit benchmark</title><style>{CSS}"
           "</style></head><body><h1>attnkit benchmark</h1><ul>"]
    out += [f"<li>{html.escape(line)}</li>" for line in _header_lines(ctx)]
    out.append("</ul>")
    for i, t in enumerate(tables(ctx)):
        out.append(f"<h2>{html.escape(t.title.replace('`', ''))}</h2>")
        out += [f"<p>{html.escape(note)}</p>" for note in t.notes]
        out.append(_html_table(t.header, list(zip(t.rows, t.classes or ("",) * len(t.rows), strict=True))))
        if i == 0 and figures:
            out.append("<h2>Figures</h2>")
            for title, fname in figures:
                data = base64.b64encode((path.parent / fname).read_bytes()).decode()
                out.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(title)} ({html.escape(fname)})</figcaption></figure>")
    out.append("</body></html>")
    path.write_text("\n".join(out))


def write_reports(out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs from ``out_dir/results.jsonl`` (into ``out_dir``).

    Raises:
        FileNotFoundError: ``out_dir`` or its ``results.jsonl`` does not exist.
        ValueError: the file holds no benchmark record.
    """
    out_dir = Path(out_dir)
    if out_dir.is_file():  # given the results file itself: the reports go beside it
        out_dir = out_dir.parent
    load_results(out_dir, "bench report")  # a missing folder or file, or no records: a clear error
    ctx = _context(out_dir / "results.jsonl")
    figures = [f for maker in FIGURE_MAKERS for f in maker(ctx["cases"], out_dir)] if ctx["cases"] else []
    write_markdown(ctx, out_dir / "report.md", figures)
    write_html(ctx, out_dir / "report.html", figures)
    return {"md": out_dir / "report.md", "html": out_dir / "report.html",
            **{f: out_dir / f for _, f in figures}}


def summary_table(out_dir: str | Path) -> tuple[tuple[str, ...], list[list[str]]]:
    """The summary table (header, rows) of a results directory, for the terminal."""
    ctx = _context(Path(out_dir) / "results.jsonl")
    return SUMMARY_COLUMNS, [summary_cells(r) for r in summary_rows(ctx["cases"])]
