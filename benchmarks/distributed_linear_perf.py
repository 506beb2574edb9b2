"""LASP-2 / LASP-2H (arXiv 2502.07563) on P local gloo processes: wall time and bytes per call.

    .venv/bin/python benchmarks/distributed_linear_perf.py            # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/distributed_linear_perf.py --quick    # smaller N, fewer repeats
    .venv/bin/python benchmarks/distributed_linear_perf.py --json out.json

Setting: fp32, B=1, H=8, D=Dv=64. LASP-2: causal linear attention with per-head decay at N=32768
(``--quick``: 8192) split into P = 1, 2, 4 equal pieces; LASP-2H: causal softmax attention at N=4096
(``--quick``: 2048). The single-process ops (``ak.linear_attention`` / ``ak.attention`` on the whole
sequence) are timed in the P=1 worker with both cores, alternating with the P=1 distributed call.

Timing is measured inside the workers: barrier, then the call; after warm-up the implementations
alternate and each rank keeps its median; the table shows the slowest rank's median (the step time).
Bytes are COUNTED (``attnkit.bench.ranks.CommCounter``): ``dist.all_gather`` / ``reduce_scatter`` /
``all_reduce``, what this rank receives (``(P-1)/P`` of the gathered buffer), forward and backward
separately, next to the formula of ``lasp2_comm_elements`` / ``lasp2h_comm_elements`` (the shape
check, a few int64s, is counted apart as "meta").

Measured (quiet machine, full run): LASP-2 fwd / fwd+bwd ms: single 124.5 / 496.0, P=2 147.5 / 529.7,
P=4 151.1 / 526.1, 131 KB (P=2) / 393 KB (P=4) received per rank each way, = the formula. LASP-2H:
single 161 / 588, P=2 412 / 1273, P=4 314 / 1043 (contiguous causal pieces: the last rank has 3/4
(P=2) of all pairs on one thread), 8.4 MB / 12.6 MB per rank each way, = the formula.

HONEST CAVEAT: this machine has 2 cores. P=1 uses 2 threads, P=2 one thread per rank, and P=4 runs
4 single-thread processes on 2 cores (oversubscribed). gloo moves the bytes through local TCP. So
the figures show the overhead and the communication volume of the algorithms (the state exchange is
independent of N; LASP-2H's grows with N), not multi-device scaling.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import attnkit as ak
from attnkit.bench.machine import default_threads
from attnkit.bench.ranks import CommCounter, fwd_bwd, run_worlds, slowest, timed
from attnkit.distributed import (
    lasp2_comm_elements,
    lasp2_linear_attention,
    lasp2h_attention,
    lasp2h_comm_elements,
    zigzag,
)

B, H, D = 1, 8, 64
CORES = default_threads()


def _decay():
    return torch.exp(-torch.tensor([2.0 ** -(i + 1) for i in range(H)]) / 8)  # TNL-like slopes, (H,)


def worker(rank: int, world: int, cfg: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    res: dict = {}
    # ---- LASP-2: causal, per-head decay
    N, n = cfg["N"], cfg["N"] // world
    full = [torch.randn(B, N, H, D, generator=g) for _ in range(3)]
    q, k, v = (x[:, rank * n:(rank + 1) * n].clone().requires_grad_() for x in full)
    dec = _decay()
    lasp = lambda: lasp2_linear_attention(q, k, v, decay=dec)  # noqa: E731
    fns = {"lasp2 fwd": lambda: lasp(), "lasp2 fwd+bwd": fwd_bwd(lasp, (q, k, v))}
    if world == 1:  # the single-process op on the whole sequence, same process and threads
        fq, fk, fv = (x.clone().requires_grad_() for x in full)
        one = lambda: ak.linear_attention(fq, fk, fv, decay=dec)  # noqa: E731
        fns.update({"single fwd": lambda: one(), "single fwd+bwd": fwd_bwd(one, (fq, fk, fv))})
    res.update(timed(fns, cfg["warmup"], cfg["reps"]))
    with CommCounter(world) as c:
        o = lasp()
    res["lasp2 bytes fwd"], res["lasp2 meta"] = c.bytes, c.meta
    with CommCounter(world) as c:
        o.sum().backward()
    res["lasp2 bytes bwd"] = c.bytes
    res["lasp2 formula"] = 4 * lasp2_comm_elements(B, H, H, D, D, world, decay=True)
    # ---- LASP-2H: causal softmax layer of a hybrid
    N, n = cfg["Nh"], cfg["Nh"] // world
    full = [torch.randn(B, N, H, D, generator=g) for _ in range(3)]
    q, k, v = (x[:, rank * n:(rank + 1) * n].clone().requires_grad_() for x in full)
    soft = lambda: lasp2h_attention(q, k, v, causal=True)  # noqa: E731
    fns = {"lasp2h fwd": lambda: soft(), "lasp2h fwd+bwd": fwd_bwd(soft, (q, k, v))}
    if world > 1:  # the same layer on zigzag pieces (every rank the same number of causal pairs)
        zq, zk, zv = (zigzag.shard(x, rank, world, "zigzag").clone().requires_grad_() for x in full)
        zz = lambda: lasp2h_attention(zq, zk, zv, causal=True, layout="zigzag")  # noqa: E731
        fns.update({"lasp2h zigzag fwd": lambda: zz(), "lasp2h zigzag fwd+bwd": fwd_bwd(zz, (zq, zk, zv))})
    if world == 1:
        fq, fk, fv = (x.clone().requires_grad_() for x in full)
        sm = lambda: ak.attention(fq, fk, fv, ak.masks.causal())  # noqa: E731
        fns.update({"single-h fwd": lambda: sm(), "single-h fwd+bwd": fwd_bwd(sm, (fq, fk, fv))})
    res.update(timed(fns, cfg["warmup"], cfg["reps"]))
    with CommCounter(world) as c:
        o = soft()
    res["lasp2h bytes fwd"] = c.bytes
    with CommCounter(world) as c:
        o.sum().backward()
    res["lasp2h bytes bwd"] = c.bytes
    res["lasp2h formula"] = 4 * lasp2h_comm_elements(B, n, H, D, D, world)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cfg = ({"N": 8192, "Nh": 2048, "warmup": 1, "reps": 3} if a.quick
           else {"N": 32768, "Nh": 4096, "warmup": 2, "reps": 7})
    out = {"config": {**cfg, "B": B, "H": H, "D": D, "dtype": "float32", "cores": CORES}, "worlds": {}}
    for P, ranks in run_worlds(worker, cfg, cores=CORES).items():
        out["worlds"][P] = slowest(ranks)
    w = out["worlds"]
    print(f"LASP-2 causal, per-head decay, N={cfg['N']} B={B} H={H} D={D} fp32 (slowest rank's median, ms)")
    print(f"  single process (2 threads): fwd {1e3 * w[1]['single fwd']:.1f}  "
          f"fwd+bwd {1e3 * w[1]['single fwd+bwd']:.1f}")
    for P, r in w.items():
        print(f"  P={P} (threads/rank {max(1, CORES // P)}): fwd {1e3 * r['lasp2 fwd']:.1f}  "
              f"fwd+bwd {1e3 * r['lasp2 fwd+bwd']:.1f}  bytes/rank fwd {r['lasp2 bytes fwd']} "
              f"bwd {r['lasp2 bytes bwd']} (formula {r['lasp2 formula']}; shape check {r['lasp2 meta']} B)")
    print(f"LASP-2H causal softmax, N={cfg['Nh']} (slowest rank's median, ms)")
    print(f"  single ak.attention (2 threads): fwd {1e3 * w[1]['single-h fwd']:.1f}  "
          f"fwd+bwd {1e3 * w[1]['single-h fwd+bwd']:.1f}")
    for P, r in w.items():
        print(f"  P={P}: fwd {1e3 * r['lasp2h fwd']:.1f}  fwd+bwd {1e3 * r['lasp2h fwd+bwd']:.1f}  "
              f"bytes/rank fwd {r['lasp2h bytes fwd']} bwd {r['lasp2h bytes bwd']} "
              f"(formula {r['lasp2h formula']})")
        if "lasp2h zigzag fwd" in r:
            print(f"  P={P} zigzag: fwd {1e3 * r['lasp2h zigzag fwd']:.1f}  "
                  f"fwd+bwd {1e3 * r['lasp2h zigzag fwd+bwd']:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
