"""The `attnkit` command line: list, info, masks, bench list-suites / list, and the quick suite end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import attnkit as ak
from attnkit.bench.results import latest_cases, load
from attnkit.cli import app

runner = CliRunner()


def invoke(*args):
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


def test_list_and_info():
    code, out = invoke("list")
    assert code == 0 and "mechanisms" in out
    specs = ak.list_mechanisms()
    if specs:
        s = specs[0]
        code, out = invoke("info", s.name)
        assert code == 0 and s.paper.arxiv in out and s.family in out
    code, out = invoke("info", "no_such_mechanism")
    assert code == 1 and "unknown mechanism" in out


def test_masks_list_and_show():
    code, out = invoke("masks", "list")
    assert code == 0 and "causal_document" in out and "sliding_window" in out
    code, out = invoke("masks", "show", "causal", "--n", "4")
    assert code == 0
    assert out.splitlines()[1:5] == ["█···", "██··", "███·", "████"]
    code, out = invoke("masks", "show", "sliding_window", "1", "--n", "4")
    assert code == 0 and out.splitlines()[1:5] == ["██··", "███·", "·███", "··██"]
    code, out = invoke("masks", "show", "document", "2", "2", "--n", "4")
    assert code == 0 and out.splitlines()[1:5] == ["██··", "██··", "··██", "··██"]
    code, out = invoke("masks", "show", "causal_document", "--n", "40")
    assert code == 0 and "density" in out
    code, out = invoke("masks", "show", "no_such_mask")
    assert code == 1 and "unknown mask" in out


def test_bench_list_suites_and_cases():
    code, out = invoke("bench", "list-suites")
    assert code == 0 and all(s in out for s in ("quick", "default", "masks", "scaling", "full", "foundation",
                                                "neighborhood", "linear", "sparse"))
    code, out = invoke("bench", "list", "--suite", "quick", "--only", "attention*")
    assert code == 0 and "attention/full/N=256/sdpa/fwd" in out
    code, out = invoke("bench", "--suite", "nope")
    assert code == 2 and "unknown suite" in out


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
    """`attnkit bench --suite quick` over every registered provider: all cases recorded, reports written."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", "attnkit.cli", "bench", "--suite", "quick", "--out", str(tmp_path),
                        "--threads", "1"],  # one thread: robust to a loaded CI machine
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = latest_cases(load(tmp_path / "results.jsonl"))
    from attnkit.bench.cases.attention import cases

    mine = {c.id for c in cases() if "quick" in c.suites}
    assert len(mine) == 14 and mine <= recs.keys()
    attention = {i: recs[i] for i in mine}
    bad = {i: r.get("reason") for i, r in recs.items() if r["status"] != "ok"}
    assert not bad, bad
    from attnkit.kernels import native

    run = next(r for r in load(tmp_path / "results.jsonl") if r.get("kind") == "run")
    nat = run["native_kernels"]  # built (or loaded) once in the roof job, kept out of every case
    assert nat is not None and nat["build_s"] >= 0
    assert (nat["status"] == "loaded") == native.available()
    for r in attention.values():
        assert r["max_abs_err"] < 1e-4 and r["gflops"] > 0 and r["peak_rss_mb"] is not None
        assert r["speedup_vs_baseline"] > 0
    for f in ("report.md", "report.html", "time_vs_n.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "summary: fastest implementation per comparison" in p.stdout


def test_masks_show_neighborhood_one_query():
    from typer.testing import CliRunner

    from attnkit.cli import app

    res = CliRunner().invoke(app, ["masks", "show", "neighborhood", "3", "--grid", "5x6", "--query", "0"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()[1:]
    # the window is shifted, not clipped, at the corner: 3x3 keys starting at (0, 0)
    assert lines == ["Q##...", "###...", "###...", "......", "......"]
    bad = CliRunner().invoke(app, ["masks", "show", "neighborhood", "9", "--grid", "5x6"])
    assert bad.exit_code == 1 and "kernel_size" in bad.output


def test_masks_show_takes_a_negative_offset():
    code, out = invoke("masks", "show", "causal", "-3", "--n", "4")
    assert code == 0, out
    assert out.splitlines()[0].startswith("causal(offset=-3)")
    assert out.splitlines()[1:5] == ["····", "····", "····", "█···"]
    code, out = invoke("masks", "show", "sliding_window", "-x")
    assert code == 1 and "'-x' is not an integer" in out


def test_python_dash_m_attnkit():
    p = subprocess.run([sys.executable, "-m", "attnkit", "masks", "show", "causal", "--n", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1:3] == ["█·", "██"]


def test_bench_compare_and_report_refuse_missing_or_garbage_files(tmp_path):
    from attnkit.bench.results import ResultsFile

    good = tmp_path / "good.jsonl"
    ResultsFile(good).append({"kind": "case", "id": "a", "status": "ok", "median_s": 1.0})
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is not json\n[1, 2, 3]\n42\n")
    for old, new, what in ((tmp_path / "missing.jsonl", good, "no such file or directory"),
                           (good, garbage, "holds no benchmark records"),
                           (good, tmp_path, "holds no results.jsonl")):
        res = runner.invoke(app, ["bench", "compare", str(old), str(new)])
        assert res.exit_code == 2 and what in res.output, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)  # a message, not a traceback
    code, out = invoke("bench", "report", str(tmp_path / "no_such_dir"))
    assert code == 1 and "no such file or directory" in out
    (tmp_path / "empty").mkdir()
    code, out = invoke("bench", "report", str(tmp_path / "empty"))
    assert code == 1 and "holds no results.jsonl" in out
    assert not (tmp_path / "empty" / "report.md").exists()


def test_bench_list_with_nothing_selected_fails():
    code, out = invoke("bench", "list", "--suite", "quick", "--only", "no_such_case*")
    assert code == 1 and "no case matches --suite quick --only no_such_case*" in out
