"""Acceptance numbers of the routed / sparse family (issue 6), measured in one process.

    .venv/bin/python benchmarks/sparse_perf.py                 # every case (~6-10 min on 2 cores)
    .venv/bin/python benchmarks/sparse_perf.py --quick         # fewer rounds
    .venv/bin/python benchmarks/sparse_perf.py --only moba     # cases whose label contains 'moba'

Setting: fwd, fp32, B=1, H=8, D=64, N=16384, 2 threads. The configurations are those of the
``full`` suite in ``attnkit/bench/cases/{sparse,sparse_more,vmoba}.py`` (and the token-routed
MoBA of the paper at N=16384). Each case's attention call (routing included, projections
excluded) alternates with dense SDPA on the same q, k, v (causal SDPA for causal cases) after a
warm-up; medians. ``ideal`` = dense FLOPs / the case's FLOPs, from the case files' own ``_area``
functions (attended pairs), ``fraction`` = achieved speedup / ideal.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time

import torch
import torch.nn.functional as F

from attnkit.bench import timing
from attnkit.bench.cases import sparse, sparse_more, vmoba

N = 16384


def _sparse_case(name: str, args: tuple):
    fn, (q, k, v), _, _ = sparse._MAKERS[name](*args)
    area = sparse._area(name, args)
    return fn, (q, k, v), area, N * N


def _more_case(name: str, args: tuple):
    fn, (q, k, v), _ = sparse_more._MAKERS[name](*args)
    area, dense = sparse_more._area(name, args)
    return fn, (q, k, v), area, dense


def _vmoba_case(mode: str):
    from attnkit.ops.routed.vmoba import vmoba_attention

    q, k, v = vmoba._qkv()
    cfg = vmoba._config()

    def fn():
        return vmoba_attention(q, k, v, vmoba.GRID, mode=mode, config=cfg, threshold=vmoba.TAU)

    return fn, (q, k, v), vmoba._DENSITY[mode] * N * N, N * N


# (label, builder); the dense baseline is SDPA, causal when the case is causal. Note: the
# S2, MoA and MoBA cases of cases/sparse.py are causal but compare to *full* SDPA there (their
# area is over N^2); here they are timed against full SDPA too, so ideal stays dense / area.
CASES = [
    ("moba_token_b512_k3", lambda: _sparse_case("moba", (N, 512, 3, "token"))),
    ("moba_block_b512_k3", lambda: _sparse_case("moba", (N, 512, 3, "block"))),
    ("moba_block_b128_k12", lambda: _sparse_case("moba", (N, 128, 12, "block"))),
    ("biformer_S8_k8", lambda: _sparse_case("biformer", (N, 8, 8))),
    ("s2_b64_l16_v8", lambda: _sparse_case("s2_attention", (N, 64, 16, 8))),
    ("moa_8head_plan", lambda: _sparse_case("moa", (N,))),
    ("psa_q128_kv64_default", lambda: _more_case("pyramid_sparse", (N, 128, 64, False))),
    ("psa_q128_kv64_causal", lambda: _more_case("pyramid_sparse", (N, 128, 64, True))),
    ("hyper_b256_m256", lambda: _more_case("hyper_attention", (N, 256, 256, 4096, False))),
    ("hyper_b256_m256_causal", lambda: _more_case("hyper_attention", (N, 256, 256, 4096, True))),
    ("vmoba_1d_tau0.25", lambda: _vmoba_case("1d")),
    ("vmoba_2d_tau0.25", lambda: _vmoba_case("2d")),
    ("vmoba_3d_tau0.25", lambda: _vmoba_case("3d")),
]
# causal baselines: only the cases whose area is over the causal triangle (sparse_more's causal ones)
CAUSAL_BASELINE = {"psa_q128_kv64_causal", "hyper_b256_m256_causal"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="2 timed rounds instead of 4")
    p.add_argument("--only", action="append", default=[], help="glob/substring on the case label (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else 4
    print(f"threads={args.threads} rounds={rounds} N={N} fwd fp32 B=1 H=8 D=64", flush=True)
    res = {}
    hdr = f"{'case':26s} {'mech ms':>9s} {'sdpa ms':>9s} {'speedup':>8s} {'ideal':>7s} {'fraction':>8s}"
    print(hdr, flush=True)
    for label, build in CASES:
        if args.only and not any(fnmatch.fnmatch(label, f"*{o}*") for o in args.only):
            continue
        fn, (q, k, v), area, dense = build()
        causal = label in CAUSAL_BASELINE
        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)

        def sdpa(qh=qh, kh=kh, vh=vh, causal=causal):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)

        with torch.no_grad():
            t = timing.alternate({"mech": fn, "sdpa": sdpa}, rounds=rounds, warmup=1, clock=time.perf_counter)
        tm, ts = statistics.median(t["mech"]), statistics.median(t["sdpa"])
        ideal = dense / area
        sp = ts / tm
        res[label] = {"mech_ms": tm * 1e3, "sdpa_ms": ts * 1e3, "speedup": sp, "ideal": ideal,
                      "fraction": sp / ideal, "baseline": "causal_sdpa" if causal else "sdpa"}
        print(f"{label:26s} {tm * 1e3:9.1f} {ts * 1e3:9.1f} {sp:7.2f}x {ideal:6.2f}x {100 * sp / ideal:7.0f}%"
              + ("  (vs causal SDPA)" if causal else ""), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
