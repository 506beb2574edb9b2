"""Acceptance numbers of the foundation (issue 2): masked attention on CPU, measured in one process.

    .venv/bin/python benchmarks/foundation_perf.py            # ~4 min on 2 cores
    .venv/bin/python benchmarks/foundation_perf.py --quick    # fewer repeats

Setting: fp32, B=1, H=8, D=64, 2 threads. Every comparison alternates its implementations after a
warm-up call and reports medians (spread as min..max); one-off costs (tile plans, BlockMask,
torch.compile) are timed apart. The matmul roof (2048^3 fp32) is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.bench.machine import measure_roof
from attnkit.bench.timing import alternate
from attnkit.ops.dense.flex import block_mask_for, compiled_flex

M = ak.masks
B, H, D = 1, 8, 64


def interleaved(fns: dict, reps: int) -> dict[str, tuple[float, float, float]]:
    """``name -> (median, min, max)`` seconds; one warm-up call each, then round-robin repeats."""
    return {n: (statistics.median(t), min(t), max(t)) for n, t in alternate(fns, reps).items()}


def qkv(n: int, h: int = H, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, n, h, D, generator=g).requires_grad_(grad) for _ in range(3)]


def sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)


def step(fn, grad: bool):
    """A zero-arg pass: forward under no_grad, or forward+backward."""
    if not grad:
        def run():
            with torch.no_grad():
                fn()
        return run

    def run_bwd():
        out = fn()
        out.backward(torch.ones_like(out))
    return run_bwd


def report(title: str, res: dict, flops: float | None = None) -> None:
    parts = []
    for n, (med, lo, hi) in res.items():
        gf = f", {flops / med / 1e9:.1f} GFLOP/s" if flops else ""
        parts.append(f"{n} {med * 1e3:.0f} ms ({lo * 1e3:.0f}..{hi * 1e3:.0f}{gf})")
    print(f"{title}: " + "; ".join(parts), flush=True)


def flex_vs_blocked(reps: int, out: dict) -> None:
    n, mask = 16384, M.sliding_window(512)
    q, k, v = qkv(n)
    t0 = time.perf_counter()
    block_mask_for(mask, B, H, n, n, q.device)
    bm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        ak.attention(q, k, v, mask=mask, backend="flex")
    compile_s = time.perf_counter() - t0
    res = interleaved({
        "blocked": step(lambda: ak.attention(q, k, v, mask=mask, backend="blocked"), False),
        "flex": step(lambda: ak.attention(q, k, v, mask=mask, backend="flex"), False),
    }, reps)
    flops = 4 * mask.count(n, n) * H * D
    report(f"sliding_window(512) N={n} fwd (flex BlockMask {bm_s:.2f} s, compile+first call {compile_s:.1f} s)",
           res, flops)
    out["sw512_16k_fwd_blocked_over_flex"] = res["flex"][0] / res["blocked"][0]
    out["flex_compile_s"] = compile_s


def vs_sdpa_mask(name: str, mask, n: int, reps: int, out: dict, *, causal_path: bool = False) -> None:
    dense = mask.to_dense(n, n)
    dens = mask.density(n, n)
    for grad in (False, True):
        _compare(name, mask, dense, dens, n, grad, reps, out, causal_path)


def _compare(name, mask, dense, dens, n, grad, reps, out, causal_path) -> None:
    """One pass kind (fwd or fwd+bwd) of :func:`vs_sdpa_mask`."""
    q, k, v = qkv(n, grad=grad)
    fns = {
        "auto": step(lambda: ak.attention(q, k, v, mask=mask), grad),
        "blocked": step(lambda: ak.attention(q, k, v, mask=mask, backend="blocked"), grad),
        "sdpa_dense_mask": step(lambda: sdpa(q, k, v, attn_mask=dense), grad),
    }
    if causal_path:
        fns["sdpa_is_causal"] = step(lambda: sdpa(q, k, v, is_causal=True), grad)
    res = interleaved(fns, reps)
    pas = "fwd+bwd" if grad else "fwd"
    flops = 4 * mask.count(n, n) * H * D * (3.5 if grad else 1.0)
    report(f"{name} N={n} {pas} density {dens:.3f} (ideal {1 / dens:.2f}x)", res, flops)
    ref = res["sdpa_is_causal" if causal_path else "sdpa_dense_mask"][0]
    for impl in ("auto", "blocked"):
        speed = res["sdpa_dense_mask"][0] / res[impl][0]
        out[f"{name}_{n}_{pas}_{impl}_speedup_vs_dense_mask"] = speed
        out[f"{name}_{n}_{pas}_{impl}_fraction_of_ideal"] = speed * dens
        out[f"{name}_{n}_{pas}_{impl}_time_over_sdpa_ref"] = res[impl][0] / ref


def memory_65536() -> float:
    """Peak RSS (GiB) of a fresh process running causal & sliding_window(512), N=65536, H=4, fwd+bwd."""
    code = (
        "import torch; torch.set_num_threads(2); import attnkit as ak\n"
        "from attnkit.bench.memory import hwm_mb\n"
        "q, k, v = (torch.randn(1, 65536, 4, 64, requires_grad=True) for _ in range(3))\n"
        "o = ak.attention(q, k, v, mask=ak.masks.causal() & ak.masks.sliding_window(512))\n"
        "o.backward(torch.ones_like(o))\n"
        "print(hwm_mb() / 1024)\n"  # VmHWM: ru_maxrss would carry the parent's peak across fork+exec
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 5
    out: dict[str, float] = {"threads": args.threads}
    out["roof_gflops"] = measure_roof("float32")
    print(f"matmul roof: {out['roof_gflops']:.1f} GFLOP/s ({args.threads} threads, torch {torch.__version__})")
    compiled_flex()
    flex_vs_blocked(reps, out)
    vs_sdpa_mask("sliding_window_512", M.sliding_window(512), 8192, reps, out)
    vs_sdpa_mask("causal", M.causal(), 8192, reps, out, causal_path=True)
    vs_sdpa_mask("document", M.zoo("full_document", 8192), 8192, reps, out)
    vs_sdpa_mask("causal_document", M.zoo("causal_document", 8192), 8192, reps, out)
    out["mem_sw_causal_65536_fwd_bwd_gib"] = memory_65536()
    out["roof_gflops_end"] = measure_roof("float32")
    mem = out["mem_sw_causal_65536_fwd_bwd_gib"]
    print(f"peak RSS, causal & sliding_window(512), N=65536 H=4 fwd+bwd: {mem:.2f} GiB")
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
