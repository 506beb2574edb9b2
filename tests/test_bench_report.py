"""Reports (md, self-contained html, PNGs), crossover lengths and `bench compare`, from synthetic records."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from attnkit.bench.analysis import crossovers, with_speedups
from attnkit.bench.compare import compare, regressions
from attnkit.bench.report import write_reports
from attnkit.bench.results import ResultsFile
from attnkit.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(impl, n, t, *, mask="sliding_window_256", pass_="fwd", status="ok", baseline=False, **kw):
    group = f"{'full' if baseline else mask}/N={n}"
    r = {"kind": "case", "id": f"attention/{group}/{impl}/{pass_}", "op": "attention", "impl": impl,
         "group": group, "pass": pass_, "baseline": baseline, "suites": ["default"], "status": status,
         "params": {"mask": "full" if baseline else mask, "N": n, "H": 8, "D": 64, "dtype": "float32",
                    "baseline_group": f"full/N={n}"},
         "flops": 1e9, "gflops": 1.0 / t if t else None, "pct_roof": 10.0, "median_s": t,
         "p20_s": t and t * 0.9, "p80_s": t and t * 1.1, "peak_rss_mb": 10.0 * n / 512, "max_abs_err": 1e-6,
         "rel_rmse": 1e-7, "setup_s": 0.01, "oneoff": {"mask_build_s": 0.002}}
    r.update(kw)
    return r


def synthetic(path):
    f = ResultsFile(path)
    f.append({"kind": "run", "run_id": "r1", "time": 0, "suite": "default", "roof_gflops": {"float32": 50.0},
              "machine": {"cpu": "Test CPU", "torch": "x", "threads": 2}, "not_installed": {"natten": 4},
              "provider_errors": {"attnkit.bench.cases.broken": "ImportError: nope"}})
    for n, dense, blocked in ((512, 0.01, 0.02), (1024, 0.04, 0.04 / 0.9), (2048, 0.16, 0.08), (4096, 0.64, 0.16)):
        f.append(rec("sdpa", n, dense, baseline=True))
        f.append(rec("blocked", n, blocked))
    f.append(rec("sdpa_dense_mask", 4096, None, status="oom", reason="first call: can't allocate memory"))
    f.append({"kind": "case", "id": "mha/dense/mha/module/fwd", "op": "mha", "impl": "module", "group": "dense/mha",
              "pass": "fwd", "baseline": False, "status": "ok", "params": {"family": "dense"}, "median_s": 0.001,
              "flops": 1e6, "gflops": 1.0})
    f.append({"kind": "run_end", "run_id": "r1", "wall_s": 12.5, "interrupted": False})


def test_speedups_and_crossover():
    f = []
    for n, dense, blocked in ((512, 0.01, 0.02), (2048, 0.16, 0.08)):
        f += [rec("sdpa", n, dense, baseline=True), rec("blocked", n, blocked)]
    out = {r["id"]: r for r in with_speedups(f)}
    assert out["attention/sliding_window_256/N=512/blocked/fwd"]["speedup_vs_baseline"] == pytest.approx(0.5)
    assert out["attention/sliding_window_256/N=2048/blocked/fwd"]["speedup_vs_baseline"] == pytest.approx(2.0)
    (c,) = [c for c in crossovers(f) if c.label == "blocked fwd"]
    assert c.n == pytest.approx(1024.0)  # halfway in log N between 0.5x and 2x
    assert c.text == "~1.0K"


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])


def test_reports_are_written_and_self_contained(tmp_path):
    synthetic(tmp_path / "results.jsonl")
    paths = write_reports(tmp_path)
    md = paths["md"].read_text()
    assert "## Summary" in md and "| comparison | pass | fastest |" in md
    assert "not installed: natten (4 cases skipped)" in md and "provider failed" in md
    assert re.search(r"\| sliding_window_256/N=4096 \| sdpa_dense_mask \| fwd \|.*\| oom: first call", md)
    assert "Efficiency length" in md and "~1.1K" in md  # 0.9x at 1024, 2x at 2048
    for f in ("time_vs_n.png", "speedup_vs_dense.png", "efficiency_vs_roof.png", "memory_vs_n.png",
              "mechanisms.png"):
        assert (tmp_path / f).read_bytes()[:8] == PNG_MAGIC
        assert f"]({f})" in md
    html = paths["html"].read_text()
    p = _Collect()
    p.feed(html)
    assert p.tags.count("table") >= 3 and len(p.imgs) == 5
    for src in p.imgs:  # embedded, so the file opens anywhere on its own
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert "Test CPU" in html and "class='bad'" in html


def _write(path, times, statuses=None):
    f = ResultsFile(path)
    for i, t in times.items():
        st = (statuses or {}).get(i, "ok")
        f.append({"kind": "case", "id": i, "status": st, "median_s": t if st == "ok" else None})


def test_compare_flags_an_injected_slowdown(tmp_path):
    old = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "gone": 1.0}
    new = {"a": 1.5, "b": 1.05, "c": 0.8, "d": 1.0, "added": 1.0}
    _write(tmp_path / "old.jsonl", old)
    _write(tmp_path / "new.jsonl", new, {"d": "timeout"})
    changes, extra = compare(tmp_path / "old.jsonl", tmp_path / "new.jsonl")
    flags = {c.id: c.flag for c in changes}
    assert flags == {"a": "regression", "b": "", "c": "improvement", "d": "failed: timeout"}
    assert {c.id for c in regressions(changes)} == {"a", "d"}
    assert next(c for c in changes if c.id == "a").ratio == pytest.approx(1.5)
    assert extra["only_old"] == ["gone"] and extra["only_new"] == ["added"]
    res = CliRunner().invoke(app, ["bench", "compare", str(tmp_path / "old.jsonl"), str(tmp_path / "new.jsonl"),
                                   "--fail"])
    assert res.exit_code == 1 and "regression" in res.output and "2 regression(s) flagged" in res.output
    res = CliRunner().invoke(app, ["bench", "compare", str(tmp_path / "old.jsonl"), str(tmp_path / "old.jsonl"),
                                   "--fail"])
    assert res.exit_code == 0 and "0 regression(s)" in res.output


def test_peer_ratios_and_scaling_tables(tmp_path):
    """Each implementation's speedup over its peers and fraction of 1/density; time ratios over N."""
    from attnkit.bench.analysis import peer_rows, scaling_rows

    dens = {"density": 0.25}
    f = [rec("blocked", 1024, 0.01, params={"N": 1024, "density": 0.25, "baseline_group": "full/N=1024"}),
         rec("sdpa_dense_mask", 1024, 0.02, params={"N": 1024, **dens}),
         rec("flex", 1024, 0.015, params={"N": 1024, **dens}),
         rec("blocked", 4096, 0.05, params={"N": 4096, **dens}),
         rec("sdpa", 4096, 1.0, baseline=True)]
    rows = {(r["rec"]["impl"], r["rec"]["params"]["N"]): r for r in peer_rows(f)}
    assert set(rows) == {("blocked", 1024), ("sdpa_dense_mask", 1024), ("flex", 1024)}  # N=4096: one impl
    b = rows[("blocked", 1024)]
    assert dict(b["faster_than"]) == pytest.approx({"sdpa_dense_mask": 2.0, "flex": 1.5})
    assert dict(b["of_ideal"]) == pytest.approx({"sdpa_dense_mask": 0.5})  # 2x of an ideal 4x
    (row,) = [r for r in scaling_rows(f) if r["label"] == "blocked fwd"]
    assert row["steps"] == [(1024, 4096, pytest.approx(5.0))]
    synthetic(tmp_path / "results.jsonl")
    ResultsFile(tmp_path / "results.jsonl").append({**f[0], "error_vs": "registered reference (spec.reference), fp64"})
    ResultsFile(tmp_path / "results.jsonl").append(f[1])
    md = write_reports(tmp_path)["md"].read_text()
    assert "## Peer ratios" in md and "## Scaling over N" in md
    peers = md.split("## Peer ratios", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in peers.splitlines() if x.startswith("| attention/sliding_window_256/N=1024 | fwd | blocked"))
    assert "sdpa_dense_mask 2.00" in line and "50% vs sdpa_dense_mask, " in line and "(ideal 4.00×)" in line
    assert "% vs sdpa (full/N=1024)" in line  # the dense baseline of another comparison counts too
    assert "max abs err / rel err vs: registered reference (spec.reference), fp64" in md
