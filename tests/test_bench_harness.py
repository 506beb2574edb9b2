"""The benchmark harness end to end, on synthetic cases (independent of attention's speed).

The providers below are loaded by the worker as ``tests/test_bench_harness.py:<function>``:
the same path a user's own ``--provider`` takes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attnkit.bench.case import Case, Runner
from attnkit.bench.discover import discover
from attnkit.bench.results import latest_cases, load

HERE = Path(__file__).resolve()
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker forks (Linux)")


# ---- synthetic providers ------------------------------------------------------------------------

def _mm_setup(n: int, pass_: str, sleep: float = 0.0):
    def setup() -> Runner:
        a = torch.randn(n, n, requires_grad=pass_ == "fwd+bwd")

        def run():
            if sleep:
                time.sleep(sleep)
            out = a @ a
            return torch.autograd.grad(out.sum(), a) if pass_ == "fwd+bwd" else out

        return Runner(run=run, check=lambda: (0.0, 0.0), oneoff={"mask_build_s": 0.001})

    return setup


def _case(group: str, impl: str, setup, pass_: str = "fwd", n: int = 64, baseline: bool = False, **kw) -> Case:
    return Case(op="mm", impl=impl, group=group, pass_=pass_, suites=frozenset({"quick"}),
                params=(("N", n), ("dtype", "float32")), flops=2.0 * n**3, setup=setup, baseline=baseline, **kw)


def fake_cases() -> list[Case]:
    out = []
    for n in (32, 64, 128):
        for pass_ in ("fwd", "fwd+bwd"):
            out.append(_case(f"mm/N={n}", "dense", _mm_setup(n, pass_), pass_, n, baseline=True))
            out.append(_case(f"mm/N={n}", "slow", _mm_setup(n, pass_, sleep=0.002), pass_, n))
    out.append(_case("peer/N=64", "nope", _mm_setup(64, "fwd"), requires="surely_not_installed_peer"))
    return out


def slow_cases() -> list[Case]:
    return [_case(f"slow/N={i}", "sleep", _mm_setup(16, "fwd", sleep=0.08), n=16 + i) for i in range(8)]


def _boom():
    raise RuntimeError("boom in run")


def _setup_raises():
    raise ValueError("bad setup")


def _setup_oom():
    def run():
        return torch.empty(2**30, dtype=torch.float32).fill_(1.0)  # 4 GiB, above --mem-limit 1

    return Runner(run=run)


def _setup_hang():
    return Runner(run=lambda: time.sleep(60))


def _setup_segv():
    return Runner(run=lambda: os.kill(os.getpid(), signal.SIGSEGV))


def bad_cases() -> list[Case]:
    return [
        _case("bad/raises", "setup", _setup_raises),
        _case("bad/raises", "run", lambda: Runner(run=_boom)),
        _case("bad/raises", "fine", _mm_setup(32, "fwd")),
        _case("bad/oom", "alloc", _setup_oom),
        _case("bad/hang", "sleep", _setup_hang),
        _case("bad/hang", "fine", _mm_setup(32, "fwd")),
        _case("bad/segv", "kill", _setup_segv),
        _case("good/after", "fine", _mm_setup(32, "fwd")),
    ]


def _noisy_setup(always: bool):
    """A run whose calls alternate 40 ms / 10 ms (p80/p20 ~1.8 over three samples); unless ``always``, only
    in the first process that sets it up (a marker file in $ATTNKIT_TEST_MARKERS), steady 10 ms after."""
    def setup() -> Runner:
        marker = Path(os.environ["ATTNKIT_TEST_MARKERS"]) / f"noisy_{always}"
        noisy = always or not marker.exists()
        marker.touch()
        calls = [0]

        def run():
            calls[0] += 1
            # the first call is the warm-up (20 ms: one call per sample), then 40 / 10 / 40 ms samples
            time.sleep(0.02 if calls[0] == 1 else 0.04 if noisy and calls[0] % 2 == 0 else 0.01)

        return Runner(run=run)

    return setup


def noisy_cases() -> list[Case]:
    return [_case("noise/once", "sleep", _noisy_setup(False)), _case("noise/always", "sleep", _noisy_setup(True)),
            # a FLOP count no machine reaches: its % roof is capped and flagged
            replace(_case("roof/over", "mm", _mm_setup(32, "fwd"), n=32), flops=1e18)]


def broken_provider() -> list[Case]:
    raise ImportError("no module named 'imaginary_dependency'")


# ---- helpers --------------------------------------------------------------------------------------

def bench_cmd(out: Path, provider: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "attnkit.cli", "bench", "--suite", "quick", "--out", str(out), "--no-builtin",
            "--provider", f"{HERE}:{provider}", "--threads", "1", *extra]


def run_bench(out: Path, provider: str, *extra: str, timeout: float = 120, **env_extra: str
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run(bench_cmd(out, provider, *extra), capture_output=True, text=True, timeout=timeout,
                          env=env)


def case_lines(path: Path) -> list[dict]:
    return [r for r in load(path) if r.get("kind") == "case"]


# ---- tests ------------------------------------------------------------------------------------------

def test_synthetic_run_end_to_end(tmp_path):
    p = run_bench(tmp_path, "fake_cases")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = latest_cases(load(tmp_path / "results.jsonl"))
    assert len(recs) == 12 and all(r["status"] == "ok" for r in recs.values())
    slow = recs["mm/mm/N=64/slow/fwd"]
    assert slow["median_s"] > 0.002 and slow["p20_s"] <= slow["median_s"] <= slow["p80_s"]
    assert 0 < slow["speedup_vs_baseline"] < 1  # the sleeping impl is slower than its baseline
    assert recs["mm/mm/N=64/dense/fwd"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert slow["flops"] == 2.0 * 64**3 and recs["mm/mm/N=64/slow/fwd+bwd"]["flops"] == 3.5 * 2.0 * 64**3
    assert slow["gflops"] == pytest.approx(slow["flops"] / slow["median_s"] / 1e9)
    assert slow["pct_roof"] == pytest.approx(100 * slow["gflops"] / slow["roof_gflops"])
    assert slow["peak_rss_mb"] is not None and slow["oneoff"] == {"mask_build_s": 0.001}
    assert slow["max_abs_err"] == 0.0 and slow["samples"] >= 2
    run = next(r for r in load(tmp_path / "results.jsonl") if r.get("kind") == "run")
    assert run["machine"]["torch"] == torch.__version__ and run["machine"]["threads"] == 1
    assert run["roof_gflops"]["float32"] > 0
    assert run["not_installed"] == {"surely_not_installed_peer": 1}
    assert "not installed: surely_not_installed_peer" in p.stdout
    for f in ("report.md", "report.html", "time_vs_n.png", "speedup_vs_dense.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_failures_are_recorded_and_the_run_goes_on(tmp_path):
    p = run_bench(tmp_path, "bad_cases", "--case-timeout", "3", "--mem-limit", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = latest_cases(load(tmp_path / "results.jsonl"))
    st = {cid.split("/", 2)[2]: (r["status"], r.get("reason", "")) for cid, r in recs.items()}
    assert st["raises/setup/fwd"][0] == "error" and "bad setup" in st["raises/setup/fwd"][1]
    assert st["raises/run/fwd"][0] == "error" and "boom in run" in st["raises/run/fwd"][1]
    assert st["oom/alloc/fwd"][0] == "oom"
    assert st["hang/sleep/fwd"][0] == "timeout" and "case-timeout" in st["hang/sleep/fwd"][1]
    assert st["segv/kill/fwd"][0] == "crashed" and "signal 11" in st["segv/kill/fwd"][1]
    for ok in ("raises/fine/fwd", "hang/fine/fwd", "after/fine/fwd"):  # neighbours and later cases still run
        assert st[ok][0] == "ok", st[ok]
    assert len(case_lines(tmp_path / "results.jsonl")) == 8


def test_sigint_then_rerun_loses_and_duplicates_nothing(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(bench_cmd(tmp_path, "slow_cases"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    results = tmp_path / "results.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and len(case_lines(results)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    first = case_lines(results)
    assert 2 <= len(first) < 8, "interrupt came too late to test anything"
    assert any(r.get("kind") == "run_end" and r["interrupted"] for r in load(results))
    assert (tmp_path / "report.html").exists()  # reports are written for the partial run too
    p = run_bench(tmp_path, "slow_cases", "--no-report")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{8 - len(first)} cases to run, {len(first)} already in the results file" in p.stdout
    ids = [r["id"] for r in case_lines(results)]
    assert len(ids) == len(set(ids)) == 8
    assert {r["id"] for r in first} <= set(ids)


def test_discover_tolerates_a_broken_provider():
    cases, errors = discover([f"{HERE}:broken_provider", f"{HERE}:slow_cases"], builtin=False)
    assert len(cases) == 8
    assert "imaginary_dependency" in errors[f"{HERE}:broken_provider"]
    _, errors = discover(["no_such_module_xyz:cases"], builtin=False)
    assert "ModuleNotFoundError" in errors["no_such_module_xyz:cases"]


def test_results_file_tolerates_a_torn_line(tmp_path):
    from attnkit.bench.results import ResultsFile

    f = ResultsFile(tmp_path / "r.jsonl")
    f.append({"kind": "case", "id": "a", "status": "ok"})
    f.append({"kind": "case", "id": "b", "status": "error"})
    with open(f.path, "a") as fh:
        fh.write('{"kind": "case", "id": "c", "sta')  # killed mid-write
    assert f.done_ids() == {"a", "b"}
    assert f.done_ids(retry_failed=True) == {"a"}
    assert json.loads(f.path.read_text().splitlines()[0])["id"] == "a"


def test_noisy_cases_are_measured_again_and_over_roof_is_capped(tmp_path):
    p = run_bench(tmp_path, "noisy_cases", "--no-memory", ATTNKIT_TEST_MARKERS=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    recs = latest_cases(load(tmp_path / "results.jsonl"))
    once, always = recs["mm/noise/once/sleep/fwd"], recs["mm/noise/always/sleep/fwd"]
    for r in (once, always):  # the first measurement was noisy, and is recorded beside the kept one
        first = r["first_measurement"]
        assert first["p80_s"] / first["p20_s"] > 1.5 and first["samples"] >= 2
    assert not once["noisy"] and once["spread"] < 1.5 and once["median_s"] < 0.02  # the steady re-measurement
    assert always["noisy"] and always["spread"] > 1.5  # noisy twice: still flagged
    over = recs["mm/roof/over/mm/fwd"]
    assert over["pct_roof"] == 100.0 and over["over_roof"] and over["pct_roof_raw"] > 100
    run = next(r for r in load(tmp_path / "results.jsonl") if r.get("kind") == "run")
    sizes = run["roof_by_size"]["float32"]
    assert len(sizes) >= 2 and run["roof_gflops"]["float32"] == max(sizes.values())  # best of several sizes
    md = (tmp_path / "report.md").read_text()
    assert "100*" in md and "re-measured (first: median" in md and "noisy: p80/p20" in md


@pytest.mark.slow
def test_force_reruns_recorded_cases_and_an_empty_selection_fails(tmp_path):
    results = tmp_path / "results.jsonl"
    p = run_bench(tmp_path, "slow_cases", "--only", "slow/N=1", "--no-memory", "--no-report")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(case_lines(results)) == 1
    p = run_bench(tmp_path, "slow_cases", "--only", "slow/N=1", "--no-memory", "--no-report", "--force")
    assert p.returncode == 0 and "1 cases to run, 0 already in the results file" in p.stdout, p.stdout + p.stderr
    assert len(case_lines(results)) == 2
    before = results.read_text()
    p = run_bench(tmp_path, "slow_cases", "--only", "no_such_case*")
    assert p.returncode == 1 and "no case matches --suite quick --only no_such_case*" in p.stdout, p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    assert results.read_text() == before  # nothing written for an empty selection


def test_an_empty_selection_runs_and_writes_nothing(tmp_path):
    from attnkit.bench.harness import BenchOptions, Harness

    opts = BenchOptions(suite="quick", out=str(tmp_path), only=("no_such_case*",), builtin=False,
                        providers=(f"{HERE}:slow_cases",), threads=1)
    summary = Harness(opts).run()
    assert summary.selected == 0 and not summary.recorded
    assert not (tmp_path / "results.jsonl").exists()


def test_fast_cases_start_each_alternating_sample_warm():
    """In a unit of several cases, a case faster than WARM_EACH_BELOW_S makes one untimed call before each
    sample (its memory may have gone idle while the others ran); alone, or slower, it makes none."""
    from attnkit.bench import timing

    opts = {"repeat": 3, "min_repeat": 3, "warmup_s": 0.0, "min_sample_s": 0.0, "unit_budget_s": 10.0,
            "case_timeout_s": 60.0}

    def counting(name):
        calls = []

        def run():
            calls.append(1)

        return _case(f"warm/{name}", name, lambda: Runner(run=run)), calls

    def sample_calls(cases_calls):
        cases = [c for c, _ in cases_calls]
        before = {}

        def emit(e):  # calls made before the first sample: setup, first call, warm-up
            if e["event"] == "begin" and e["phase"] == "sample 1/3":
                for c, calls in cases_calls:
                    before.setdefault(c.id, len(calls))
        timing.measure_unit(cases, opts, emit)
        return [len(calls) - before[c.id] for c, calls in cases_calls]

    old = timing.WARM_EACH_BELOW_S
    try:  # 3 samples of one call each, each after a warm call
        assert sample_calls([counting("a"), counting("b")]) == [6, 6]
        timing.WARM_EACH_BELOW_S = 0.0                 # nothing counts as fast: no warm calls
        assert sample_calls([counting("a"), counting("b")]) == [3, 3]
        timing.WARM_EACH_BELOW_S = old
        assert sample_calls([counting("alone")]) == [3]  # a lone case alternates with nothing
    finally:
        timing.WARM_EACH_BELOW_S = old
