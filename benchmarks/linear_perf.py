"""Acceptance numbers of the linear-attention family (issue 4), measured in one process.

    .venv/bin/python benchmarks/linear_perf.py            # everything (~3-5 min on 2 cores)
    .venv/bin/python benchmarks/linear_perf.py --quick    # smaller repeat counts

Setting: fp32, B=1, H=8, D=Dv=64, 2 threads, causal, per-head decay (TNL 'released' schedule, layer 0).
Every comparison alternates the implementations after warm-up and reports medians; the matmul roof
(2048^3 fp32 ``mm``) is measured in the same run, interleaved with the timed cases.

FLOP counts (forward, per head):
  * algorithm: the Lightning-2 chunk algorithm as executed, full C x C tiles:
    ``2 N C (D + Dv)`` (intra) + ``4 N D Dv`` (inter read + state update), C = 64;
  * useful: the same with only the causal half of the intra tile: ``N C (D + Dv) + 4 N D Dv``.
Memory: peak RSS of a fresh subprocess running forward+backward at N=65536, minus its RSS after the
inputs were built (so: activations, outputs, gradients and workspace of the op itself).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from attnkit.bench import timing

B, H, D = 1, 8, 64
CHUNK = 64


def _decay():
    from attnkit.ops.linear.decay import tnl_decay

    return tnl_decay(H, 0, 24)


def inputs(N, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g).requires_grad_(grad) for _ in range(3)]


CLOCK = time.perf_counter


def alternate(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Median seconds per implementation, calling them in turn (a, b, c, a, b, c, ...)."""
    times = timing.alternate(fns, rounds, warmup, clock=CLOCK)
    return {n: statistics.median(ts) for n, ts in times.items()}


def roof_fn():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return lambda: a @ b, 2 * 2048 ** 3


def algo_flops(N):
    return B * H * (2 * N * CHUNK * 2 * D + 4 * N * D * D)


def useful_flops(N):
    return B * H * (N * CHUNK * 2 * D + 4 * N * D * D)


def fwd_fn(N, decay=True):
    import attnkit as ak

    q, k, v = inputs(N)
    lam = _decay() if decay else None
    return lambda: ak.linear_attention(q, k, v, decay=lam, backend="chunk")


def memory_child(N: int) -> None:
    """Run in a subprocess: print peak-RSS growth of one forward+backward."""
    import attnkit as ak

    torch.set_num_threads(2)
    q, k, v = inputs(N, grad=True)
    do = torch.randn(B, N, H, D)
    lam = _decay()
    small = inputs(256, grad=True)  # warm the allocator and code paths
    ak.linear_attention(*small, decay=lam).sum().backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    o = ak.linear_attention(q, k, v, decay=lam, backend="chunk")
    o.backward(do)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"N": N, "base_mib": base / 1024, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--memory-child", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time (use with --threads 1 on a loaded machine: excludes time "
                        "spent descheduled)")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} clock={args.clock}", flush=True)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    r = 3 if args.quick else 7
    import attnkit as ak

    res = {}
    mm, mm_flops = roof_fn()
    # 1. scaling 16384 -> 65536 and efficiency vs the matmul roof, interleaved
    t = alternate({"roof": mm, "n16k": fwd_fn(16384), "n64k": fwd_fn(65536)}, rounds=r)
    roof = mm_flops / t["roof"] / 1e9
    res["roof_gflops"] = roof
    res["t16k_s"], res["t64k_s"] = t["n16k"], t["n64k"]
    res["ratio_64k_16k"] = t["n64k"] / t["n16k"]
    res["gflops_alg_16k"] = algo_flops(16384) / t["n16k"] / 1e9
    res["gflops_useful_16k"] = useful_flops(16384) / t["n16k"] / 1e9
    res["eff_alg_16k"] = res["gflops_alg_16k"] / roof
    res["eff_useful_16k"] = res["gflops_useful_16k"] / roof
    print(f"matmul roof {roof:.1f} GFLOP/s; fwd N=16384 {t['n16k'] * 1e3:.1f} ms, N=65536 {t['n64k'] * 1e3:.1f} ms, "
          f"ratio {res['ratio_64k_16k']:.2f} (<= 4.6)")
    print(f"N=16384: {res['gflops_alg_16k']:.1f} GFLOP/s algorithm ({100 * res['eff_alg_16k']:.0f}% of roof), "
          f"{res['gflops_useful_16k']:.1f} useful ({100 * res['eff_useful_16k']:.0f}%)  (>= 40%)", flush=True)

    # 2. fwd+bwd time at 16384 (for the record)
    q, k, v = inputs(16384, grad=True)
    lam = _decay()
    t = alternate({"fb": lambda: ak.linear_attention(q, k, v, decay=lam).sum().backward(), "roof": mm}, rounds=r)
    res["t16k_fwdbwd_s"] = t["fb"]
    print(f"fwd+bwd N=16384 {t['fb'] * 1e3:.1f} ms ({t['fb'] / res['t16k_s']:.2f}x fwd)", flush=True)

    # 3. vs fla's naive_chunk_linear_attn (no decay: the same math as ours without decay)
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from test_linear_fla import _fla_dir, load_fla_naive

        naive = load_fla_naive("linear_attn") if _fla_dir() else None
    except Exception as e:  # pragma: no cover - optional peer
        naive = None
        print("fla not available:", e)
    if naive is not None:
        q, k, v = inputs(16384)
        with torch.no_grad():
            t = alternate({
                "fla": lambda: naive.naive_chunk_linear_attn(q, k, v),
                "ours_nodecay": lambda: ak.linear_attention(q, k, v, backend="chunk"),
                "ours_decay": lambda: ak.linear_attention(q, k, v, decay=lam, backend="chunk"),
            }, rounds=r)
        res.update({f"t16k_{n}_s": x for n, x in t.items()})
        res["speedup_vs_fla"] = t["fla"] / t["ours_nodecay"]
        res["speedup_vs_fla_decay"] = t["fla"] / t["ours_decay"]
        print(f"vs fla naive_chunk_linear_attn N=16384: fla {t['fla'] * 1e3:.1f} ms, "
              f"ours {t['ours_nodecay'] * 1e3:.1f} "
              f"ms (no decay) -> {res['speedup_vs_fla']:.2f}x; ours with decay {t['ours_decay'] * 1e3:.1f} ms -> "
              f"{res['speedup_vs_fla_decay']:.2f}x  (>= 3x)", flush=True)

    # 4. memory of forward+backward at N=65536, in a fresh process
    out = subprocess.run([sys.executable, __file__, "--memory-child", "65536"], capture_output=True, text=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    res["mem_fwdbwd_64k_mib"] = mem["delta_mib"]
    res["mem_peak_rss_64k_mib"] = mem["peak_mib"]
    print(f"fwd+bwd N=65536: +{mem['delta_mib']:.0f} MiB over the inputs (peak RSS {mem['peak_mib']:.0f} MiB; "
          f"< 2048 MiB)", flush=True)

    # 5. crossover vs causal SDPA (forward)
    import torch.nn.functional as F

    cross = None
    for N in (64, 128, 256, 512, 1024, 2048, 4096, 8192):
        q, k, v = inputs(N)
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, N, D)
        with torch.no_grad():
            t = alternate({
                "linear": lambda q=q, k=k, v=v: ak.linear_attention(q, k, v, decay=lam, backend="chunk"),
                "sdpa": lambda qh=qh, kh=kh, vh=vh: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True),
            }, rounds=r)
        res[f"cross_{N}"] = t
        print(f"N={N:5d}: linear {t['linear'] * 1e3:8.2f} ms, causal SDPA {t['sdpa'] * 1e3:8.2f} ms", flush=True)
        if cross is None and t["linear"] < t["sdpa"]:
            cross = N
    res["crossover_N"] = cross
    print(f"crossover: causal linear attention beats causal SDPA from N = {cross}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
