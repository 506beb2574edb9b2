"""Acceptance ratios of neighborhood attention on CPU (issue 3), measured in one process.

Implementations are timed alternately after warm-up and compared by medians; one-off costs
(flex compilation, BlockMask and dense-mask construction, tile plans) are reported apart.

    .venv/bin/python benchmarks/neighborhood_perf.py            # all cases
    .venv/bin/python benchmarks/neighborhood_perf.py --cases 2d --reps 5

Cases (fp32, H=8, D=64, B=1, 2 threads):
  2d   64x64, kernel 13x13: forward vs torch.compile(flex_attention) + NA BlockMask (target >= 1.5x);
       forward+backward vs SDPA with a dense bool mask (target >= 25% of the ideal 1/density).
  1d   N=16384, kernel 1025: forward vs flex (target >= 1.2x).
  3d   16x32x32, kernel 7x7x7: forward+backward peak RSS in a fresh subprocess (target <= 2 GiB).
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
from attnkit.bench import timing
from attnkit.masks.neighborhood import neighborhood_mask
from attnkit.ops.neighborhood.flex import compiled_flex, na_block_mask

H, D = 8, 64


def alternate(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run in turn (a, b, a, b, ...) after ``warmup`` rounds."""
    return {k: statistics.median(v) for k, v in timing.alternate(fns, reps, warmup).items()}


def inputs(shape, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, *shape, H, D, generator=g).requires_grad_(grad) for _ in range(3)]


def heads_first(t):
    return t.reshape(t.shape[0], -1, H, D).transpose(1, 2).contiguous()  # (B, H, N, D)


def flex_setup(shape, kernel):
    """Compiled flex callable with an NA BlockMask; returns (fn, mask_build_s, compile_s, density)."""
    m = neighborhood_mask(shape, kernel)
    t0 = time.perf_counter()
    bm = na_block_mask(m)
    build = time.perf_counter() - t0
    q, k, v = (heads_first(t) for t in inputs(shape, seed=1))
    fn = compiled_flex()
    t0 = time.perf_counter()
    fn(q, k, v, block_mask=bm)
    compile_s = time.perf_counter() - t0
    return (lambda qf, kf, vf: fn(qf, kf, vf, block_mask=bm)), build, compile_s, m


def case_fwd_vs_flex(shape, kernel, reps):
    flex, build, compile_s, m = flex_setup(shape, kernel)
    q, k, v = inputs(shape)
    qf, kf, vf = (heads_first(t) for t in (q, k, v))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = ak.neighborhood_attention(q, k, v, kernel)  # also builds the tile plan (one-off)
    plan_s = time.perf_counter() - t0
    ref = flex(qf, kf, vf).transpose(1, 2).reshape(out.shape)
    err = (out - ref).abs().max().item()

    def tiled():
        with torch.no_grad():
            ak.neighborhood_attention(q, k, v, kernel)

    med = alternate({"tiled": tiled, "flex": lambda: flex(qf, kf, vf)}, reps)
    return {"case": f"{'x'.join(map(str, shape))} k{kernel} fwd vs flex", "tiled_s": med["tiled"],
            "flex_s": med["flex"], "speedup": med["flex"] / med["tiled"], "flex_compile_s": compile_s,
            "flex_blockmask_s": build, "first_call_s": plan_s, "max_abs_err_vs_flex": err,
            "density": m.density()}


def case_fwdbwd_vs_sdpa(shape, kernel, reps):
    q, k, v = inputs(shape, grad=True)
    qf, kf, vf = (heads_first(t).detach().requires_grad_() for t in (q, k, v))
    m = neighborhood_mask(shape, kernel)
    t0 = time.perf_counter()
    dense = m.to_dense()
    mask_s = time.perf_counter() - t0
    g = torch.randn(1, *shape, H, D)
    gf = heads_first(g)

    def tiled():
        q.grad = k.grad = v.grad = None
        ak.neighborhood_attention(q, k, v, kernel).backward(g)

    def sdpa():
        qf.grad = kf.grad = vf.grad = None
        F.scaled_dot_product_attention(qf, kf, vf, attn_mask=dense).backward(gf)

    tiled()
    sdpa()
    err = (q.grad.reshape(1, -1, H, D).transpose(1, 2) - qf.grad).abs().max().item()
    med = alternate({"tiled": tiled, "sdpa_dense_mask": sdpa}, reps, warmup=0)
    ideal = 1.0 / m.density()
    speed = med["sdpa_dense_mask"] / med["tiled"]
    return {"case": f"{'x'.join(map(str, shape))} k{kernel} fwd+bwd vs sdpa_dense_mask", "tiled_s": med["tiled"],
            "sdpa_dense_mask_s": med["sdpa_dense_mask"], "speedup": speed, "ideal_speedup": ideal,
            "fraction_of_ideal": speed / ideal, "dense_mask_build_s": mask_s, "max_abs_err_dq": err}


_CHILD = r"""
import json, time, torch
torch.set_num_threads(2)
import attnkit as ak
shape, kernel = (16, 32, 32), 7
q, k, v = [torch.randn(1, *shape, 8, 64, requires_grad=True) for _ in range(3)]
g = torch.randn(1, *shape, 8, 64)
def status(key):  # VmHWM is this process's own peak (ru_maxrss survives exec from the parent)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024
base = status("VmRSS")
t = time.perf_counter()
ak.neighborhood_attention(q, k, v, kernel).backward(g)
first = time.perf_counter() - t
q.grad = k.grad = v.grad = None
t = time.perf_counter()
ak.neighborhood_attention(q, k, v, kernel).backward(g)
second = time.perf_counter() - t
peak = status("VmHWM")
print(json.dumps({"peak_rss_bytes": peak, "rss_before_op_bytes": base, "first_fwdbwd_s": first, "fwdbwd_s": second}))
"""


def case_3d_memory():
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["case"] = "16x32x32 k7 fwd+bwd memory"
    r["peak_rss_gib"] = r["peak_rss_bytes"] / 2**30
    r["within_2gib"] = r["peak_rss_bytes"] <= 2 * 2**30
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="2d,1d,3d")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = args.cases.split(",")
    results = []
    if "2d" in cases:
        results.append(case_fwd_vs_flex((64, 64), 13, args.reps))
        print(json.dumps(results[-1]), flush=True)
        results.append(case_fwdbwd_vs_sdpa((64, 64), 13, max(3, args.reps - 2)))
        print(json.dumps(results[-1]), flush=True)
    if "1d" in cases:
        results.append(case_fwd_vs_flex((16384,), 1025, args.reps))
        print(json.dumps(results[-1]), flush=True)
    if "3d" in cases:
        results.append(case_3d_memory())
        print(json.dumps(results[-1]), flush=True)
    print("\nsummary (target in brackets)")
    for r in results:
        if "fraction_of_ideal" in r:
            print(f"  {r['case']}: {r['speedup']:.2f}x = {100 * r['fraction_of_ideal']:.0f}% of ideal "
                  f"{r['ideal_speedup']:.1f}x [>= 25%]")
        elif "flex_s" in r:
            target = 1.5 if "64x64" in r["case"] else 1.2
            print(f"  {r['case']}: {r['speedup']:.2f}x (tiled {r['tiled_s'] * 1e3:.0f} ms, flex "
                  f"{r['flex_s'] * 1e3:.0f} ms, compile {r['flex_compile_s']:.1f} s) [>= {target}x]")
        else:
            print(f"  {r['case']}: peak RSS {r['peak_rss_gib']:.2f} GiB, fwd+bwd {r['fwdbwd_s']:.2f} s [<= 2 GiB]")


if __name__ == "__main__":
    main()
