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


def _table(md, heading):
    """The rows (cells) of the markdown table under ``## heading...``."""
    part = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]


def test_speed_versus_the_baseline_is_in_words_and_names_the_baseline(tmp_path):
    """"× dense SDPA 0.50" read as a speedup: the cell says faster/slower, and which baseline."""
    f = ResultsFile(tmp_path / "results.jsonl")
    f.append({"kind": "run", "run_id": "r", "time": 0, "suite": "default", "roof_gflops": {"float32": 50.0}})
    f.append(rec("sdpa", 1024, 0.02, baseline=True))
    f.append(rec("blocked", 1024, 0.01))
    f.append(rec("sdpa_dense_mask", 1024, 0.04))
    lin = {"op": "linear_attention", "params": {"N": 1024, "dtype": "float32"}}
    f.append({**rec("sdpa_causal", 1024, 0.03), **lin, "id": "linear_attention/causal_decay/N=1024/sdpa_causal/fwd",
              "group": "causal_decay/N=1024", "baseline": True})
    f.append({**rec("chunk", 1024, 0.01), **lin, "id": "linear_attention/causal_decay/N=1024/chunk/fwd",
              "group": "causal_decay/N=1024"})
    md = write_reports(tmp_path)["md"].read_text()
    cases = _table(md, "attention — suite")
    col = cases[0].index("vs baseline")
    got = {r[1]: r[col] for r in cases[1:]}
    assert got == {"sdpa": "baseline", "blocked": "2.00× faster than dense SDPA",
                   "sdpa_dense_mask": "2.00× slower than dense SDPA"}
    lin_rows = _table(md, "linear_attention — suite")
    assert lin_rows[2][:2] == ["causal_decay/N=1024", "chunk"]
    assert lin_rows[2][col] == "3.00× faster than causal softmax SDPA"
    summary = _table(md, "Summary")
    assert any(r[summary[0].index("vs baseline")] == "3.00× faster than causal softmax SDPA" for r in summary[1:])
    assert "× dense SDPA" not in md


def test_a_case_above_the_roof_is_capped_and_flagged(tmp_path):
    from attnkit.bench.results import roof_share

    assert roof_share(57.0, 50.0) == {"pct_roof": 100.0, "pct_roof_raw": pytest.approx(114.0), "over_roof": True}
    assert roof_share(25.0, 50.0) == {"pct_roof": 50.0}
    synthetic(tmp_path / "results.jsonl")
    ResultsFile(tmp_path / "results.jsonl").append(rec("blocked", 4096, 0.16, pct_roof=100.0, pct_roof_raw=114.0,
                                                       over_roof=True))
    md = write_reports(tmp_path)["md"].read_text()
    rows = _table(md, "attention — suite")
    row = next(r for r in rows if r[:3] == ["sliding_window_256/N=4096", "blocked", "fwd"])
    assert row[rows[0].index("% roof")] == "100*"
    assert "above roof: 114% uncapped" in row[rows[0].index("flags")]
    assert "`100*` marks a case that ran above the measured roof" in md  # what the flag means


def test_noisy_and_remeasured_cases_are_flagged(tmp_path):
    synthetic(tmp_path / "results.jsonl")
    first = {"median_s": 0.03, "p20_s": 0.02, "p80_s": 0.05, "samples": 3}
    f = ResultsFile(tmp_path / "results.jsonl")
    f.append(rec("blocked", 2048, 0.08, p20_s=0.079, p80_s=0.081, first_measurement=first))  # clean the 2nd time
    f.append(rec("blocked", 1024, 0.04, p20_s=0.03, p80_s=0.06, first_measurement=first))  # noisy twice
    md = write_reports(tmp_path)["md"].read_text()
    rows = _table(md, "attention — suite")
    fl = {r[0]: r[rows[0].index("flags")] for r in rows if r[1] == "blocked"}
    assert fl["sliding_window_256/N=2048"] == "re-measured (first: median 30 ms, p80/p20 ×2.50)"
    assert fl["sliding_window_256/N=1024"].startswith("noisy: p80/p20 ×2.00 after re-measuring; re-measured")
    assert fl["sliding_window_256/N=512"] == ""
    assert "noisy: when a case's p80/p20 exceeds 1.5, its comparison is timed once more" in md


def test_html_has_every_table_of_the_markdown(tmp_path):
    synthetic(tmp_path / "results.jsonl")
    paths = write_reports(tmp_path)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    heads = [h for h in re.findall(r"^## (.+)$", md, re.M) if h != "Figures"]
    assert any(h.startswith("Where the time went") for h in heads)
    for h in heads:
        assert f"<h2>{h.replace('`', '')}</h2>" in page.replace("&#x27;", "'"), h
    assert page.count("<table>") == len(heads)


def _fig_records():
    out = []
    for n, t in ((512, 0.01), (1024, 0.03), (2048, 0.1)):
        for pass_, k in (("fwd", 1), ("fwd+bwd", 3)):
            out += [rec("sdpa", n, k * t, baseline=True, pass_=pass_), rec("blocked", n, k * t / 2, pass_=pass_)]
    na = {"op": "neighborhood_attention", "group": "na2d_32x32_k7"}
    for impl, t in (("sdpa", 0.02), ("tiled", 0.01)):
        for pass_ in ("fwd", "fwd+bwd"):
            out.append({**rec(impl, 1024, t, pass_=pass_, baseline=impl == "sdpa"), **na,
                        "id": f"neighborhood_attention/na2d_32x32_k7/{impl}/{pass_}",
                        "params": {"N": 1024, "baseline_group": "na2d_32x32_k7"}})
    out.append({"kind": "case", "id": "mha/dense/mha/module/fwd", "op": "mha", "impl": "module", "group": "dense/mha",
                "pass": "fwd", "status": "ok", "params": {}, "median_s": 0.001})
    out.append({"kind": "case", "id": "mha/dense/mha/module/fwd+bwd", "op": "mha", "impl": "module",
                "group": "dense/mha", "pass": "fwd+bwd", "status": "ok", "params": {}, "median_s": 0.003})
    return out


def test_plots_bars_for_single_n_lines_told_apart_by_pass():
    from attnkit.bench.analysis import crossovers, series
    from attnkit.bench.plots import FIGURES, dot_figure, series_figure

    recs = with_speedups(_fig_records())
    panels = series(recs)
    for _, title, key, ylabel, logy, scale in FIGURES:
        fig = series_figure(title, key, ylabel, logy, scale, panels, crossovers(recs))
        if fig is None:
            continue
        axes = {ax.get_title().split(" (vs")[0]: ax for ax in fig.axes if ax.get_title()}
        na = axes["neighborhood_attention: na2d_32x32_k7"]  # one N: bars from zero on a linear axis
        assert len(na.patches) >= 2 and na.get_yscale() == "linear" and na.get_ylim()[0] == 0
        assert not [ln for ln in na.get_lines() if ln.get_marker() not in ("None", "", None)]  # no dot columns
        hatches = {p.get_hatch() or "" for p in na.patches}
        colours = {p.get_facecolor() for p in na.patches}
        assert len(hatches) == 2 and len(colours) == 2  # fwd vs fwd+bwd
        assert {t.get_text() for t in na.get_legend().get_texts()} == {"fwd", "fwd+bwd"}
        att = axes["attention: sliding_window_256"]
        lines = {ln.get_label(): ln for ln in att.get_lines() if not ln.get_label().startswith("_")}
        fwd, both = lines["blocked fwd"], lines["blocked fwd+bwd"]
        assert fwd.get_marker() != both.get_marker() and fwd.get_color() != both.get_color()
        assert att.get_legend() is not None
        for ax in fig.axes:  # never a bar on a log axis
            if ax.patches:
                assert ax.get_yscale() == "linear" and ax.get_xscale() == "linear", ax.get_title()
    fig = dot_figure(recs)
    (ax,) = fig.axes
    assert not ax.patches and ax.get_xscale() == "log"  # a dot plot on the log axis, not bars
    marks = {ln.get_label(): ln.get_marker() for ln in ax.get_lines()}
    assert marks.keys() == {"fwd", "fwd+bwd"} and len(set(marks.values())) == 2
