"""The terminal side of a run: a live table of finished cases under a progress bar with ETA.

On a terminal it redraws in place (rich ``Live``); elsewhere (CI logs, pipes) it prints
one line per finished case. Either way it is only a view: results are already on disk.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from attnkit.bench.analysis import relative_speed
from attnkit.bench.report import ms, roof_cell, status

_STYLE = {"ok": "", "error": "red", "oom": "magenta", "timeout": "yellow", "crashed": "red", "skipped": "dim"}


def case_table(records: list[dict[str, Any]], title: str | None = None) -> Table:
    """A rich table of case records (the live view and ``attnkit bench`` use it)."""
    t = Table(title=title, show_lines=False, header_style="bold", pad_edge=False)
    for col, just in (("case", "left"), ("median ms", "right"), ("GFLOP/s", "right"), ("% roof", "right"),
                      ("vs baseline", "right"), ("peak MiB", "right"), ("max err", "right"), ("status", "left")):
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for r in records:
        def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            return "" if r.get(key) is None else fmt.format(r[key])

        t.add_row(r["id"], ms(r), f("gflops", "{:.1f}"), roof_cell(r),
                  relative_speed(r.get("speedup_vs_baseline"), short=True),
                  f("peak_rss_mb", "{:.0f}"), f("max_abs_err", "{:.0e}"), status(r)[:60],
                  style=_STYLE.get(r.get("status", ""), ""))
    return t


class LiveView:
    """``on_event`` for :class:`attnkit.bench.harness.Harness`; use as a context manager."""

    def __init__(self, console: Console | None = None, rows: int = 14) -> None:
        self.console = console or Console()
        self.recent: deque[dict[str, Any]] = deque(maxlen=rows)
        self.tty = self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description}", justify="left"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("starting", total=None)
        self.live: Live | None = None

    def _render(self) -> Group:
        return Group(case_table(list(self.recent)), self.progress)

    def __enter__(self) -> LiveView:
        if self.tty:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "plan":
            self.progress.update(self.task, total=payload["total"], description="measuring")
            msg = f"{payload['total']} cases to run, {payload['skipped_done']} already in the results file"
            for peer, n in payload["not_installed"].items():
                msg += f"\nnot installed: {peer} ({n} cases skipped)"
            for name, err in payload["provider_errors"].items():
                msg += f"\n[red]provider failed[/red]: {name}: {err}"
            self.console.print(msg)
        elif kind == "roof":
            self.console.print("matmul roof (GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in payload.items() if v))
        elif kind == "worker" and payload.get("event") == "begin":
            self.progress.update(self.task, description=f"{payload['id']} [dim]{payload['phase']}[/dim]")
        elif kind == "case":
            self.recent.append(payload)
            self.progress.advance(self.task)
            if not self.tty:
                r = payload
                self.console.print(f"{r['id']}: {ms(r) or '-'} ms  {status(r)}", highlight=False)
        elif kind == "stopping":
            self.console.print("[yellow]stopping: finishing nothing more; results so far are saved "
                               "(Ctrl-C again to quit at once)[/yellow]")
        if self.live is not None:
            self.live.update(self._render())
