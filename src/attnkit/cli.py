"""``attnkit``: the command line (typer + rich).

    attnkit list [GLOB]                 registered mechanisms
    attnkit info NAME                   one mechanism: paper, patterns, complexity, config, notes
    attnkit masks list                  the mask zoo
    attnkit masks show NAME [ARGS] [--n N]   a picture of a mask
    attnkit bench [--suite S] [--out DIR] [--only GLOB] [--backend B] [--dtype T] [--pass P]
                  [--case-timeout S] [--repeat N] [--force]   run a benchmark suite, write reports
    attnkit bench list-suites | list | report DIR | compare OLD NEW
    attnkit analyze --model minilm --text "..." --analysis rollout --out DIR   attention maps: PNGs + JSON

``python -m attnkit`` runs the same command line.

Suites: quick, default, masks, scaling, full, and one per op family (foundation, neighborhood,
linear, sparse) holding the comparisons that family's performance claims rest on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from attnkit.analysis.cli import app as analyze_app

app = typer.Typer(help="attnkit: attention mechanisms behind one interface, measured side by side.",
                  no_args_is_help=True, add_completion=False)
masks_app = typer.Typer(help="Mask patterns: list the zoo, draw one.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmark every mechanism and backend side by side.")
app.add_typer(masks_app, name="masks")
app.add_typer(bench_app, name="bench")
app.add_typer(analyze_app, name="analyze")
console = Console() if Console().is_terminal else Console(width=160)
DEFAULT_OUT = Path("bench-results")


@app.command("list")
def list_cmd(pattern: Annotated[str, typer.Argument(help="glob on the mechanism name")] = "*",
             family: Annotated[str | None, typer.Option(help="only this family")] = None) -> None:
    """Registered mechanisms (name, family, paper, patterns, complexity)."""
    import attnkit as ak

    specs = ak.list_mechanisms(pattern, family=family)
    t = Table(title=f"{len(specs)} mechanisms", header_style="bold")
    for col in ("name", "family", "paper", "arXiv", "patterns", "complexity"):
        t.add_column(col, overflow="fold")
    for s in specs:
        t.add_row(s.name, s.family, s.paper.title, s.paper.arxiv, ", ".join(s.patterns), s.complexity)
    console.print(t)


@app.command()
def info(name: str) -> None:
    """Everything the registry knows about one mechanism."""
    import attnkit as ak

    try:
        s = ak.info(name)
    except KeyError as e:
        console.print(f"[red]{e.args[0]}[/red]")
        raise typer.Exit(1) from None
    try:
        flops = f"{s.flops(dict(s.default_config)):.4g}"
    except Exception as e:  # a spec's flops() failing is information, not a crash
        flops = f"n/a ({type(e).__name__})"
    rows = [("name", s.name), ("family", s.family), ("paper", str(s.paper)), ("module", s.module.__qualname__),
            ("input", s.input_kind), ("patterns", ", ".join(s.patterns)), ("complexity", s.complexity),
            ("default config", json.dumps(s.default_config, default=str)), ("fwd FLOPs (default)", flops),
            ("notes", s.notes or "—")]
    t = Table(show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


_FACTORIES = ("causal", "sliding_window", "dilated_sliding_window", "chunked", "block_causal", "document",
              "prefix_lm", "global_tokens", "strided", "prefix_lm_document", "share_question", "causal_blockwise")


def build_mask(name: str, args: list[str], n: int):
    """A mask from a factory name and integer args (``sliding_window 4``), else from the zoo."""
    import attnkit.masks as m

    try:
        ints = [int(a) for a in args]
    except ValueError:
        bad = next(a for a in args if not a.lstrip("-").isdigit())
        what = f"unknown option {bad!r}" if bad.startswith("--") else f"{bad!r} is not an integer"
        raise ValueError(f"masks show: {what}; the factory arguments are integers (a negative one such as -3 is "
                         f"an offset), got {' '.join(args)!r}") from None
    if name in ("document", "share_question", "causal_blockwise"):
        return getattr(m, name)(ints or [n])
    if name == "prefix_lm_document":
        return m.prefix_lm_document(ints[:-1], ints[-1]) if len(ints) > 1 else m.zoo(name, n)
    if name in _FACTORIES and (ints or name == "causal"):
        return getattr(m, name)(*ints)
    return m.zoo(name, n)


@masks_app.command("list")
def masks_list(n: Annotated[int, typer.Option("--n", help="length of the densities")] = 1024) -> None:
    """The mask zoo (LongCA-bench's patterns and more) with each mask's density at N."""
    import attnkit.masks as m

    t = Table(title=f"mask zoo (density at N={n})", header_style="bold")
    for col in ("name", "mask", "density"):
        t.add_column(col)
    for name in m.ZOO:
        mask = m.zoo(name, n)
        t.add_row(name, repr(mask) if mask is not None else "full", f"{mask.density(n, n):.4f}" if mask else "1")
    console.print(t)
    console.print(f"factories: {', '.join(_FACTORIES)} (e.g. `attnkit masks show sliding_window 4 --n 16`)")


def _neighborhood_picture(args: list[str], grid: str | None, query: int | None, dilation: int,
                          causal: bool) -> str:
    """``neighborhood K [K ...] --grid 16x16 --query I``: one query's window on the grid."""
    import attnkit.masks as m

    if not grid:
        raise ValueError("neighborhood needs --grid, e.g. --grid 16x16 (one extent per dimension)")
    shape = tuple(int(x) for x in grid.lower().split("x"))
    kernel = tuple(int(a) for a in args) or (3,)
    kernel = kernel * len(shape) if len(kernel) == 1 else kernel
    mask = m.neighborhood(shape, kernel, dilation=dilation, is_causal=causal)
    total = 1
    for s in shape:
        total *= s
    q = total // 2 if query is None else query
    return mask.picture(q)


# ``-3`` in ``attnkit masks show causal -3`` is a negative integer argument (an offset), not an option:
# unknown option-like tokens are passed through as arguments, and build_mask checks they are integers.
@masks_app.command("show", context_settings={"ignore_unknown_options": True})
def masks_show(name: str,
               args: Annotated[list[str] | None, typer.Argument(help="integer args of the factory")] = None,
               n: Annotated[int, typer.Option("--n", help="sequence length to draw")] = 32,
               grid: Annotated[str | None, typer.Option(help="neighborhood: grid extents, e.g. 16x16")] = None,
               query: Annotated[int | None, typer.Option(help="neighborhood: flat query index to draw")] = None,
               dilation: Annotated[int, typer.Option(help="neighborhood: dilation")] = 1,
               causal: Annotated[bool, typer.Option(help="neighborhood: causal in every dim")] = False) -> None:
    """Draw a mask: a zoo name (`causal_document`), a factory with args (`sliding_window 4`), or one
    query's neighborhood (`neighborhood 7 --grid 16x16 --query 100`)."""
    import attnkit as ak

    try:
        if name == "neighborhood":
            console.print(_neighborhood_picture(list(args or []), grid, query, dilation, causal), highlight=False)
            return
        mask = build_mask(name, list(args or []), n)
    except (KeyError, ValueError, TypeError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    if mask is None:
        console.print(f"full  Nq={n} Nk={n}  density=1 (every query sees every key)")
        return
    console.print(ak.masks.show(mask, n), highlight=False)


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    suite: Annotated[str, typer.Option(help="a suite of `attnkit bench list-suites` (quick, default, full, "
                                            "foundation, neighborhood, linear, sparse, ...)")] = "default",
    out: Annotated[Path, typer.Option(help="results.jsonl, report.md/.html and PNGs go here")] = DEFAULT_OUT,
    only: Annotated[list[str] | None, typer.Option(help="glob on case id, op or group (repeatable)")] = None,
    backend: Annotated[list[str] | None, typer.Option(help="glob on the implementation (repeatable)")] = None,
    dtype: Annotated[list[str] | None, typer.Option(help="float32, float64, ... (repeatable)")] = None,
    pass_: Annotated[list[str] | None, typer.Option("--pass", help="fwd or fwd+bwd (repeatable)")] = None,
    case_timeout: Annotated[float | None, typer.Option(help="seconds one call may take (suite's)")] = None,
    repeat: Annotated[int | None, typer.Option(help="timed samples per case (suite's)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (OMP_NUM_THREADS or cores)")] = None,
    memory: Annotated[bool | None, typer.Option("--memory/--no-memory", help="peak RSS per case")] = None,
    mem_limit: Annotated[float | None, typer.Option(help="GiB a case may allocate (85% of free)")] = None,
    provider: Annotated[list[str] | None, typer.Option(help="extra cases: module:func or file.py:func")] = None,
    builtin: Annotated[bool, typer.Option("--builtin/--no-builtin", help="attnkit's own cases")] = True,
    retry_failed: Annotated[bool, typer.Option(help="rerun cases recorded as error/oom/timeout")] = False,
    force: Annotated[bool, typer.Option("--force", help="rerun every selected case, even those already recorded "
                                                         "(the new records replace the old in reports)")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write report.md/.html at the end")] = True,
) -> None:
    """Run a suite; every finished case is appended to OUT/results.jsonl, then reports are written."""
    if ctx.invoked_subcommand is not None:
        return
    import psutil

    from attnkit.bench.harness import BenchOptions, Harness, describe_filters
    from attnkit.bench.live import LiveView
    from attnkit.bench.report import summary_table, write_reports
    from attnkit.bench.suites import all_suites

    SUITES = all_suites()

    if suite not in SUITES:
        console.print(f"[red]unknown suite {suite!r}; suites: {', '.join(SUITES)}[/red]")
        raise typer.Exit(2)
    opts = BenchOptions(
        suite=suite, out=str(out), only=tuple(only or ()), backend=tuple(backend or ()), dtype=tuple(dtype or ()),
        passes=tuple(pass_ or ()), case_timeout_s=case_timeout, repeat=repeat, threads=threads, memory=memory,
        mem_limit_gb=mem_limit if mem_limit is not None else 0.85 * psutil.virtual_memory().available / 2**30,
        providers=tuple(provider or ()), builtin=builtin, retry_failed=retry_failed, force=force)
    view = LiveView(console)
    harness = Harness(opts, on_event=view, fork_worker=True)  # forks before the live view starts a thread
    with view:
        summary = harness.run()
    if not summary.selected:
        console.print(f"[red]no case matches {describe_filters(opts)}; see `attnkit bench list --suite {suite}`"
                      "[/red]")
        for name, err in summary.provider_errors.items():
            console.print(f"[red]provider failed[/red]: {name}: {err}")
        raise typer.Exit(1)
    if not report:
        console.print(f"{len(summary.recorded)} cases recorded this run in {summary.wall_s:.0f} s -> {out}")
        raise typer.Exit(130 if summary.interrupted else 0)
    paths = write_reports(out)
    header, rows = summary_table(out)
    t = Table(title="summary: fastest implementation per comparison", header_style="bold")
    for col in header:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print(f"{len(summary.recorded)} cases recorded this run ({summary.skipped_done} already done) in "
                  f"{summary.wall_s:.0f} s -> {paths['md']}, {paths['html']}")
    if summary.interrupted:
        console.print("[yellow]interrupted: rerun the same command to finish (finished cases are skipped)[/yellow]")
        raise typer.Exit(130)


@bench_app.command("list-suites")
def list_suites() -> None:
    """The suites and how each is measured."""
    from attnkit.bench.suites import all_suites

    SUITES = all_suites()

    t = Table(header_style="bold")
    for col in ("suite", "what", "repeat", "case timeout s", "memory"):
        t.add_column(col, overflow="fold")
    for s in SUITES.values():
        t.add_row(s.name, s.description, str(s.repeat), f"{s.case_timeout_s:g}", "yes" if s.memory else "no")
    console.print(t)


@bench_app.command("list")
def list_cases(suite: Annotated[str, typer.Option()] = "default",
               only: Annotated[list[str] | None, typer.Option()] = None,
               provider: Annotated[list[str] | None, typer.Option()] = None) -> None:
    """The cases a suite would run (nothing is measured)."""
    from attnkit.bench.discover import discover
    from attnkit.bench.harness import BenchOptions, describe_filters, select

    found, errors = discover(list(provider or ()))
    opts = BenchOptions(suite=suite, only=tuple(only or ()))
    chosen = select(found, suite, opts)
    for c in chosen:
        console.print(f"{c.id}  [dim]{c.flops:.3g} FLOP fwd[/dim]", highlight=False)
    for name, err in errors.items():
        console.print(f"[red]provider failed[/red]: {name}: {err}")
    console.print(f"{len(chosen)} cases in suite {suite!r}")
    if not chosen:
        console.print(f"[red]no case matches {describe_filters(opts)}[/red]")
        raise typer.Exit(1)


@bench_app.command("report")
def report(out: Annotated[Path, typer.Argument(help="a directory holding results.jsonl")] = DEFAULT_OUT) -> None:
    """Rebuild report.md, report.html and the PNGs from a results file."""
    from attnkit.bench.report import write_reports

    try:
        paths = write_reports(out)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    console.print(f"wrote {paths['md']} and {paths['html']}")


@bench_app.command("compare")
def compare_cmd(old: Path, new: Path,
                threshold: Annotated[float, typer.Option(help="flag ratios beyond 1 ± this")] = 0.10,
                fail: Annotated[bool, typer.Option(help="exit 1 when a regression is flagged")] = False) -> None:
    """Per-case time ratio NEW/OLD of two results files (or directories); flags > threshold."""
    from attnkit.bench.compare import compare, regressions

    try:
        changes, extra = compare(old, new, threshold)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    t = Table(title=f"new / old median time (flag beyond ±{threshold:.0%})", header_style="bold")
    for col in ("case", "old ms", "new ms", "ratio", "flag"):
        t.add_column(col, overflow="fold")
    colour = {"regression": "red", "improvement": "green", "fixed": "green"}
    for c in changes:
        t.add_row(c.id, "" if c.old_s is None else f"{c.old_s * 1e3:.3g}",
                  "" if c.new_s is None else f"{c.new_s * 1e3:.3g}", "" if c.ratio is None else f"{c.ratio:.2f}",
                  c.flag, style=colour.get(c.flag, "red" if c.flag.startswith("failed") else ""))
    console.print(t)
    console.print(f"old: {extra['machines'][0]}\nnew: {extra['machines'][1]}")
    if extra["only_old"] or extra["only_new"]:
        console.print(f"only in old: {len(extra['only_old'])}, only in new: {len(extra['only_new'])}")
    bad = regressions(changes)
    console.print(f"{len(bad)} regression(s) flagged")
    if fail and bad:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
