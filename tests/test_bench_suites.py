"""The per-family suites (foundation, neighborhood, linear, sparse): listed, their presets run small
end to end, the data-dependent FLOPs of VMoBA, the mechanism error vs the registered reference,
and the multi-process helpers of ``attnkit.bench.ranks``.

The tiny providers below are loaded by the worker as ``tests/test_bench_suites.py:<function>``, the
path a user's own ``--provider`` takes; they build the same presets as the suites at small sizes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from attnkit.bench.case import Case
from attnkit.bench.cases import attention, linear, neighborhood, sparse, sparse_more, vmoba
from attnkit.bench.cases.mechanisms import REFERENCE_VS, SELF_VS, check_against_reference
from attnkit.bench.discover import discover, peer_installed
from attnkit.bench.harness import BenchOptions, select, units
from attnkit.bench.results import case_record, latest_cases, load
from attnkit.bench.timing import measure_unit
from attnkit.cli import app

HERE = Path(__file__).resolve()
FAMILY_SUITES = ("foundation", "neighborhood", "linear", "sparse")
TINY_OPTS = {"repeat": 2, "min_repeat": 1, "warmup_s": 0.0, "min_sample_s": 0.0, "unit_budget_s": 0.05,
             "case_timeout_s": 60.0}


# ---- tiny presets (the suites' builders at small sizes; no torch.compile) ----------------------------

def _no_compile(cs: list[Case]) -> list[Case]:
    return [c for c in cs if c.impl != "flex" and peer_installed(c.requires)]


def tiny_foundation() -> list[Case]:
    return _no_compile(attention.foundation(n_flex=256, n_masks=256, n_memory=512, h_memory=2, suites=("foundation",)))


def tiny_neighborhood() -> list[Case]:
    return _no_compile(neighborhood.acceptance((8, 8), 3, (64,), 9, (4, 4, 4), 3, suites=("neighborhood",)))


def tiny_linear() -> list[Case]:
    return _no_compile(linear.acceptance(n=128, n_long=256, n_cross=(64, 128), suites=("linear",)))


def tiny_sparse() -> list[Case]:
    s = {"sparse"}
    return [*sparse.comparison("moba", "moba_block_b64_k2", (512, 64, 2, "block"), s),
            *sparse.comparison("biformer", "biformer_S4_k2", (256, 4, 2), s),
            *sparse_more.comparison("pyramid_sparse", "psa_q128_kv64_causal", (512, 128, 64, True), s),
            *vmoba.comparisons(grid=(4, 16, 16), modes=("3d",), suites=("sparse",))]


# ---- tests ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def found() -> list[Case]:
    cases, errors = discover()
    family = [name for name in errors if name.rsplit(".", 1)[-1] in ("attention", "neighborhood", "linear",
                                                                        "sparse", "sparse_more", "vmoba")]
    assert not family, {n: errors[n] for n in family}
    return cases


def test_family_suites_are_listed_and_hold_their_comparisons(found):
    res = CliRunner().invoke(app, ["bench", "list-suites"])
    assert res.exit_code == 0 and all(s in res.output for s in FAMILY_SUITES)
    ids = {s: {c.id for c in select(found, s, BenchOptions(suite=s))} for s in FAMILY_SUITES}
    assert {"attention/sliding_window_512/N=16384/blocked/fwd", "attention/sliding_window_512/N=16384/flex/fwd",
            "attention/causal/N=8192/auto/fwd+bwd", "attention/causal/N=8192/sdpa_causal/fwd+bwd",
            "attention/full_document/N=8192/sdpa_dense_mask/fwd",
            "attention/sliding_window_causal_512/N=65536/H=4/auto/fwd+bwd"} <= ids["foundation"]
    assert {"neighborhood_attention/na2d_64x64_k13/flex/fwd",
            "neighborhood_attention/na2d_64x64_k13/sdpa_dense_mask/fwd+bwd",
            "neighborhood_attention/na1d_16384_k1025/flex/fwd",
            "neighborhood_attention/na3d_16x32x32_k7/tiled/fwd+bwd",
            "neighborhood_attention/na3d_16x32x32_k7/sdpa_dense_mask/fwd+bwd"} == ids["neighborhood"] - {
        "neighborhood_attention/na2d_64x64_k13/tiled/fwd", "neighborhood_attention/na2d_64x64_k13/tiled/fwd+bwd",
        "neighborhood_attention/na1d_16384_k1025/tiled/fwd"}
    assert {"linear_attention/causal_decay/N=65536/chunk/fwd", "linear_attention/causal/N=16384/fla_naive/fwd",
            "linear_attention/causal/N=16384/chunk_decay/fwd", "linear_attention/causal_decay/N=64/sdpa_causal/fwd",
            "linear_attention/causal_decay/N=65536/chunk/fwd+bwd"} <= ids["linear"]
    ops = {c.op for c in found if c.id in ids["sparse"]}
    assert ops == {"moba", "biformer", "s2_attention", "moa", "pyramid_sparse", "hyper_attention", "vmoba",
                   "sparsifiner", "orion_msp"}
    # every routed comparison at N=16384, except Sparsifiner's exact token top-k (its selection alone costs more
    # than dense attention there, so it runs at N=4096)
    assert len(ids["sparse"]) == 34
    assert {i for i in ids["sparse"] if "N=16384" not in i} == {
        "sparsifiner/sparsifiner_token_keep0.25_r128/N=4096/tiles/fwd",
        "sparsifiner/sparsifiner_token_keep0.25_r128/N=4096/sdpa/fwd"}
    res = CliRunner().invoke(app, ["bench", "list", "--suite", "sparse", "--only", "vmoba"])
    assert res.exit_code == 0 and "vmoba/vmoba_3d_tau0.25/N=16384/dispatch/fwd" in res.output


@pytest.mark.parametrize("provider", [tiny_foundation, tiny_neighborhood, tiny_linear, tiny_sparse])
def test_tiny_preset_runs(provider):
    """Every case of a family preset, at small sizes, sets up, runs, and matches its reference."""
    results = {}
    for unit in units(provider()):
        measure_unit(unit, TINY_OPTS, lambda e: results.__setitem__(e["id"], e) if e["event"] == "result" else None)
    assert results and all(r["status"] == "ok" for r in results.values()), \
        {i: r.get("reason") for i, r in results.items() if r["status"] != "ok"}
    for i, r in results.items():
        if "max_abs_err" in r:
            assert r["max_abs_err"] < 1e-3, (i, r["max_abs_err"])


def test_vmoba_flops_come_from_the_selection():
    (case, _) = vmoba.comparisons(grid=(4, 16, 16), modes=("2d",), suites=("t",))
    runner = case.setup()
    from attnkit.ops.routed.vmoba import block_shape, partition_ids, vmoba_attention

    q, k, v = vmoba._qkv(1024)
    grid, cfg = (4, 16, 16), vmoba._config()
    _, sel = vmoba_attention(q, k, v, grid, mode="2d", config=cfg, threshold=vmoba.TAU, return_layout=True)
    ids = partition_ids(grid, block_shape(grid, "2d", cfg))
    pairs = sel[..., ids].sum().item() / (sel.shape[0] * sel.shape[1])  # token-level count, per head
    assert runner.flops == pytest.approx(4.0 * vmoba.B * vmoba.H * vmoba.D * pairs)
    assert runner.params["density"] == pytest.approx(pairs / 1024**2, abs=1e-6)
    assert 0 < runner.params["density"] < 1
    rec = case_record(case, {"status": "ok", "median_s": 0.5, "flops_fwd": runner.flops,
                             "measured_params": runner.params}, roof=100.0, run_id="r")
    assert rec["flops"] == runner.flops and rec["params"]["density"] == runner.params["density"]
    assert rec["params"]["grid"] == "4x16x16" and rec["gflops"] == pytest.approx(runner.flops / 0.5 / 1e9)


def test_mechanism_error_is_against_the_registered_reference():
    torch.manual_seed(0)
    module, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    seen = []

    def reference(mod, inp):
        seen.append((next(mod.parameters()).dtype, inp.dtype))
        return mod(inp) + 0.25  # a reference that disagrees by a known amount

    err, rel, what = check_against_reference(SimpleNamespace(reference=reference), module, (x,))
    assert what == REFERENCE_VS and seen == [(torch.float64, torch.float64)]
    assert err == pytest.approx(0.25, abs=1e-5) and rel > 0
    assert next(module.parameters()).dtype == torch.float32  # the reference ran on a copy
    err, _, what = check_against_reference(SimpleNamespace(), module, (x,))  # no reference registered
    assert what == SELF_VS and err < 1e-5


def test_tiny_sparse_suite_end_to_end(tmp_path):
    """`attnkit bench --suite sparse` on the tiny preset: recorded, and the report's peer ratios give each
    speedup over dense SDPA and its fraction of 1/density."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "attnkit.cli", "bench", "--suite", "sparse", "--out", str(tmp_path),
                        "--no-builtin", "--provider", f"{HERE}:tiny_sparse", "--threads", "1", "--repeat", "2",
                        "--only", "moba*", "--only", "vmoba*"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = latest_cases(load(tmp_path / "results.jsonl"))
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs.values()), recs
    vm = recs["vmoba/vmoba_3d_tau0.25/N=1024/dispatch/fwd"]
    assert 0 < vm["params"]["density"] < 1 and vm["flops_fwd"] < recs["vmoba/vmoba_3d_tau0.25/N=1024/sdpa/fwd"]["flops"]
    assert "under the op's own selection" in vm["error_vs"]
    md = (tmp_path / "report.md").read_text()
    assert "## Peer ratios" in md
    row = next(line for line in md.splitlines() if line.startswith("| vmoba/vmoba_3d_tau0.25/N=1024 | fwd | dispatch"))
    assert "sdpa " in row and "% vs sdpa" in row and f"(ideal {1 / vm['params']['density']:.2f}×)" in row
    assert "max abs err / rel err vs: fp64 attention under the op's own selection" in md


# ---- multi-process helpers ------------------------------------------------------------------------

def _ring_worker(rank: int, world: int, cfg: dict) -> dict:
    from attnkit.bench.ranks import CommCounter, fwd_bwd, timed
    from attnkit.distributed import ring_attention

    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, cfg["n"], 2, 8, generator=g, requires_grad=True) for _ in range(3))
    f = lambda: ring_attention(q, k, v, causal=True)  # noqa: E731
    res = timed({"fwd": f, "fwd+bwd": fwd_bwd(f, (q, k, v))}, warmup=0, reps=1, cpu=True)
    with CommCounter(world) as c:
        f()
    return {**res, "bytes": c.bytes, "meta": c.meta}


@pytest.mark.slow
def test_ranks_helpers_count_the_ring_bytes():
    from attnkit.bench.ranks import run_worlds, slowest

    out = run_worlds(_ring_worker, {"n": 16}, worlds=(2,), cores=2)
    step = slowest(out[2])
    assert set(step) == {"fwd", "fwd+bwd", "fwd cpu", "fwd+bwd cpu", "bytes", "meta"}
    # forward: K and V of the other rank arrive once, fp32: (P - 1) * n * H * 2 * D * 4 bytes
    assert all(r["bytes"] == 1 * 16 * 2 * 2 * 8 * 4 for r in out[2]) and step["meta"] > 0
    assert math.isfinite(step["fwd+bwd"]) and step["fwd+bwd"] > 0
