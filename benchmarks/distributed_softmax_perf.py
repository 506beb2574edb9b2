"""Ring Attention (2310.01889), DeepSpeed-Ulysses (2309.14509) and USP (2405.07719) on P local gloo
processes: wall time and bytes per rank per call.

    .venv/bin/python benchmarks/distributed_softmax_perf.py            # N=8192, ~5 min on 2 cores
    .venv/bin/python benchmarks/distributed_softmax_perf.py --quick    # N=4096, ~1.5 min
    .venv/bin/python benchmarks/distributed_softmax_perf.py --json out.json

Setting: causal self-attention, fp32, B=1, H=Hkv=8, D=Dv=64, the sequence split over P = 1, 2, 4
ranks: ring with contiguous shards, ring with zigzag shards, Ulysses (``ak.attention`` on the full
sequence of H/P heads) and, at P=4, USP with a 2x2 mesh (zigzag over the ring). The single-process
``ak.attention`` on the whole sequence is timed in the P=1 worker with both cores, alternating with
the P=1 calls.

Timing is measured inside the workers: barrier, then the call; after warm-up the methods alternate
and each rank keeps its median; the table shows the slowest rank's median (the step time).
Bytes are COUNTED (``attnkit.bench.ranks.CommCounter``): ``dist.batch_isend_irecv`` (ring P2P:
bytes received), ``dist.all_to_all`` (bytes received from other ranks) and ``dist.all_gather`` (the
shard-shape check, a few int64s, shown apart as "meta"), forward and backward separately, next to
the communication volumes of the papers' schemes: ring fwd ``(P-1)*n*Hkv*(D+Dv)*4`` bytes, bwd
``(P-1)*n*Hkv*(D+Dv)*4`` (K, V again) plus ``P*n*Hkv*(D+Dv)*4`` (dK, dV accumulators travel home);
Ulysses fwd ``(P-1)/P*n*(2H*D+2Hkv*Dv)*4`` ((P-1)/P of the local q, k, v and out), bwd the same for
dout, dq, dk, dv (n = N/P); USP the all-to-all terms over P_u plus the ring terms over P_r (the ring
block then has P_u*n tokens of H/P_u heads, so the same bytes per rank as a ring of n tokens and H heads).
The causal work per rank (allowed pairs) is printed for the two ring layouts: contiguous gives
rank P-1 about 2P-1 times rank 0's work, zigzag gives every rank the same; next to it each rank's
CPU time (``time.process_time``: busy time, which contention on the cores does not inflate) shows
the balance as measured.

HONEST CAVEAT: this machine has 2 cores. P=1 uses 2 threads, P=2 one thread per rank, and P=4 runs
4 single-thread processes on 2 cores (oversubscribed); gloo moves the bytes through local TCP. So
the figures show the overhead, load balance and communication volume of the algorithms, not
multi-device scaling.

Measured here (N=8192, quiet machine; slowest rank's median ms, fwd / fwd+bwd):
  single ak.attention 679 / 2490; P=1: ring 686 / 2653 (one fused block), Ulysses 687 / 2386.
  P=2: ring contiguous 1006 / 3617, ring zigzag 670 / 2343 (1.50x / 1.54x: the 3:1 vs 1:1 causal pair
  split), Ulysses 754 / 2402; per-rank fwd CPU s: contiguous [0.34, 1.00], zigzag [0.62, 0.67].
  P=4 (oversubscribed): ring contiguous 810 / 2915, zigzag 743 / 2713, Ulysses 744 / 2574, USP 2x2 zigzag
  854 / 2526; per-rank fwd CPU s: contiguous [0.12, 0.27, 0.43, 0.59], zigzag [0.35, 0.37, 0.36, 0.36].
  Counted bytes per rank equal the formulas, e.g. P=4 fwd/bwd: ring 25.2 / 58.7 MB, Ulysses 12.6 / 12.6 MB,
  USP 2x2 16.8 / 33.6 MB.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import attnkit as ak
from attnkit.bench.machine import default_threads
from attnkit.bench.ranks import CommCounter, fwd_bwd, run_worlds, slowest, timed
from attnkit.distributed import make_usp_groups, ring_attention, ulysses_attention, usp_attention, usp_shard, zigzag

B, H, D = 1, 8, 64
CORES = default_threads()


def formulas(N: int, P: int, pu: int = 1) -> dict:
    """Bytes per rank per call (fp32), forward and backward, for ring / Ulysses / USP(pu, P/pu)."""
    n, e, pr = N // P, 4, P // pu
    kv = n * H * 2 * D * e                   # this rank's K and V shard (Hkv = H, Dv = D)
    a2a = lambda p: (p - 1) / p * n * H * 4 * D * e  # noqa: E731  q, k, v, out (or their grads)
    ring_f = lambda p, m: (p - 1) * m        # noqa: E731
    ring_b = lambda p, m: (p - 1) * m + p * m if p > 1 else 0  # noqa: E731
    return {"ring": (ring_f(P, kv), ring_b(P, kv)), "ulysses": (a2a(P), a2a(P)),
            "usp": (a2a(pu) + ring_f(pr, kv), a2a(pu) + ring_b(pr, kv))}


def worker(rank: int, world: int, cfg: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    N = cfg["N"]
    full = [torch.randn(B, N, H, D, generator=g) for _ in range(3)]
    ops = {}

    def add(name, layout, call, shard=None):
        shard = shard or (lambda x: zigzag.shard(x, rank, world, layout))
        q, k, v = (shard(x).clone().requires_grad_() for x in full)
        f = lambda: call(q, k, v)  # noqa: E731
        ops[name] = (f, (q, k, v))

    add("ring contiguous", "contiguous", lambda q, k, v: ring_attention(q, k, v, causal=True))
    add("ring zigzag", "zigzag", lambda q, k, v: ring_attention(q, k, v, causal=True, layout="zigzag"))
    add("ulysses", "contiguous", lambda q, k, v: ulysses_attention(q, k, v, ak.masks.causal()))
    if world == 4:
        ug, rg = make_usp_groups(2, 2)
        add("usp 2x2 zigzag", "zigzag",
            lambda q, k, v: usp_attention(q, k, v, causal=True, ulysses_group=ug, ring_group=rg, layout="zigzag"),
            shard=lambda x: usp_shard(x, rank, 2, 2, "zigzag"))
    if world == 1:  # the single-process op on the whole sequence, same process and threads
        add("single ak.attention", "contiguous", lambda q, k, v: ak.attention(q, k, v, ak.masks.causal()))
    fns = {}
    for name, (f, leaves) in ops.items():
        fns[f"{name} fwd"] = f
        fns[f"{name} fwd+bwd"] = fwd_bwd(f, leaves)
    res = timed(fns, cfg["warmup"], cfg["reps"], cpu=True)
    for name, (f, _) in ops.items():
        if name.startswith("single"):
            continue
        with CommCounter(world) as c:
            o = f()
        res[f"{name} bytes fwd"], res[f"{name} meta"] = c.bytes, c.meta
        with CommCounter(world) as c:
            o.sum().backward()
        res[f"{name} bytes bwd"] = c.bytes
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cfg = {"N": 4096, "warmup": 1, "reps": 3} if a.quick else {"N": 8192, "warmup": 1, "reps": 3}
    out = {"config": {**cfg, "B": B, "H": H, "D": D, "dtype": "float32", "cores": CORES}, "worlds": {}}
    for P, ranks in run_worlds(worker, cfg, cores=CORES).items():
        out["worlds"][P] = slowest(ranks)
        out["worlds"][P]["cpu per rank"] = {kk: [r[kk] for r in ranks] for kk in ranks[0] if kk.endswith("cpu")}
    N, w = cfg["N"], out["worlds"]
    print(f"causal softmax CP, N={N} B={B} H={H} D={D} fp32; slowest rank's median ms (fwd / fwd+bwd)")
    s = w[1]
    print(f"  single ak.attention (2 threads): {1e3 * s['single ak.attention fwd']:.1f} / "
          f"{1e3 * s['single ak.attention fwd+bwd']:.1f}")
    for P, r in w.items():
        print(f"  P={P} (threads/rank {max(1, CORES // P)}):")
        for name in ("ring contiguous", "ring zigzag", "ulysses", "usp 2x2 zigzag"):
            if f"{name} fwd" not in r:
                continue
            kind = name.split()[0]
            fml = formulas(N, P, pu=2 if kind == "usp" else 1)[kind]
            print(f"    {name:16s} {1e3 * r[f'{name} fwd']:8.1f} / {1e3 * r[f'{name} fwd+bwd']:8.1f}   bytes/rank "
                  f"fwd {r[f'{name} bytes fwd']:>10d} bwd {r[f'{name} bytes bwd']:>10d}  (formula "
                  f"{fml[0]:.0f} / {fml[1]:.0f}; shape check {r[f'{name} meta']} B)")
        cpu = r["cpu per rank"]
        print("    CPU seconds per rank, fwd (process time: busy, not waiting): " + "; ".join(
            f"{name} {[round(x, 2) for x in cpu[f'{name} fwd cpu']]}" for name in ("ring contiguous", "ring zigzag")))
        n = N // P
        pairs = {lay: [zigzag.causal_pairs(n, q, P, lay) for q in range(P)] for lay in zigzag.LAYOUTS}
        print(f"    causal pairs per rank: contiguous {pairs['contiguous']}, zigzag {pairs['zigzag']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
