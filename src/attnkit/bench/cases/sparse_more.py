"""Cases for PSA (pyramid sparse) and HyperAttention, following ``cases/sparse.py``.

Each group times one mechanism's attention core (routing/hashing included, projections
excluded) against dense SDPA on the same q, k, v, interleaved. ``flops`` counts the
(query, key) pairs really attended (PSA: a pooled key is one pair; HyperAttention: block +
samples per query, recursion included), ``density`` is that area over the dense area and
``ideal_speedup = 1 / density``. Checks: PSA vs fp64 pyramid attention with its own level map
on 32 rows; HyperAttention vs exact attention (its estimation error, not a bug check).
Shapes: B=1, H=8, D=64, fp32, fwd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn

B, H, D = 1, 8, 64


def _qkv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, H, D, generator=g) for _ in range(3))  # (B, N, H, D)


def _errs(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    got = got.double()
    return (got - ref).abs().max().item(), ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def _psa(n: int, bq: int, bk: int, causal: bool):
    from attnkit.ops.routed.psa import PSAConfig, psa_attention

    q, k, v = _qkv(n)
    cfg = PSAConfig(block_q=bq, block_kv=bk, causal=causal)

    def check():
        out, lm = psa_attention(q, k, v, cfg, return_levels=True)  # lm (B, H, nqb, nkb)
        rows = torch.linspace(0, n - 1, 32).long()
        logits, vals = [], []
        for lvl in range(cfg.levels):
            r = 2 ** lvl
            kr = k[0].double().view(n // r, r, H, D).mean(1)  # (N/r, H, D)
            vr = v[0].double().view(n // r, r, H, D).mean(1)
            s = torch.einsum("rhd,khd->hrk", q[0, rows].double(), kr) * D ** -0.5 + math.log(r)  # (H, R, N/r)
            p = torch.arange(n // r)
            ok = lm[0][:, rows // bq][:, :, p * r // bk] == r
            if causal:
                ok &= ((p + 1) * r - 1)[None, None] <= rows[None, :, None]
            logits.append(s.masked_fill(~ok, float("-inf")))
            vals.append(vr)
        ref = torch.einsum("hrk,khd->rhd", torch.softmax(torch.cat(logits, -1), -1), torch.cat(vals, 0))
        return _errs(out[0, rows], ref)

    return lambda: psa_attention(q, k, v, cfg), (q, k, v), check


def _hyper(n: int, bs: int, m: int, nmin: int, causal: bool):
    from attnkit.ops.routed.hyper import hyper_attention

    q, k, v = _qkv(n)

    def fn():
        return hyper_attention(q, k, v, block_size=bs, sample_size=m, min_seq_len=nmin, causal=causal,
                               generator=torch.Generator().manual_seed(0))

    def check():  # estimation error vs exact attention on 32 rows
        rows = torch.linspace(0, n - 1, 32).long()
        s = torch.einsum("rhd,khd->hrk", q[0, rows].double(), k[0].double()) * D ** -0.5  # (H, R, N)
        if causal:
            s = s.masked_fill(torch.arange(n)[None, None] > rows[None, :, None], float("-inf"))
        return _errs(fn()[0, rows], torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), v[0].double()))

    return fn, (q, k, v), check


_MAKERS = {"pyramid_sparse": _psa, "hyper_attention": _hyper}


def _area(name: str, args: tuple) -> tuple[float, float]:
    """(attended pairs, dense pairs) without building inputs."""
    n, causal = args[0], args[-1]
    dense = n * (n + 1) / 2 if causal else n * n
    if name == "pyramid_sparse":
        from attnkit.ops.routed.psa import DEFAULT_RATIOS, band_ends

        _, bq, bk, _ = args
        nqb, nkb = math.ceil(n / bq), n // bk
        total = 0.0
        for i in range(nqb):  # causal: candidates up to the query block's last token (about half pairs)
            ncand = min(nkb, ((i + 1) * bq - 1) // bk + 1) if causal else nkb
            forced = ncand - (i * bq) // bk if causal else 0
            ends = [0, *band_ends(ncand, DEFAULT_RATIOS, forced)]
            total += bq * sum((ends[j + 1] - ends[j]) * bk / 2 ** j for j in range(len(ends) - 1))
        return total, dense

    _, bs, m, nmin, _ = args

    def rec(t: int) -> float:
        if t <= nmin:
            return t * (t + 1) / 2
        return rec(t // 2) + rec(t - t // 2) + (t - t // 2) * (bs + m)

    return (rec(n) if causal else n * (bs + m)), dense


def _setup(name: str, impl: str, args: tuple) -> Callable[[], Runner]:
    def setup() -> Runner:
        fn, (q, k, v), check = _MAKERS[name](*args)
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)

            run = pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=args[-1]), "fwd")

            return Runner(run=run)

        run = pass_fn(fn, "fwd")

        def chk():
            with torch.no_grad():
                return check()

        return Runner(run=run, check=chk)

    return setup


def comparison(name: str, label: str, args: tuple, suites: set[str] | frozenset[str]) -> list[Case]:
    """Mechanism ``name`` (``"pyramid_sparse"``, ``"hyper_attention"``) with its maker's ``args``
    (N first, causal last) vs SDPA (causal when the case is): two cases of group ``label/N=...``."""
    n = args[0]
    area, dense = _area(name, args)
    density = area / dense
    params = (("N", n), ("B", B), ("H", H), ("D", D), ("dtype", "float32"), ("config", label),
              ("density", round(density, 6)), ("ideal_speedup", round(1 / density, 3)),
              ("baseline_group", f"{'causal' if args[-1] else 'full'}/N={n}"))
    group = f"{label}/N={n}"
    impl = "fused" if name == "pyramid_sparse" else "lsh_sample"  # the no-grad path of each forward
    return [
        Case(op=name, impl=impl, group=group, pass_="fwd", suites=frozenset(suites), params=params,
             flops=4.0 * B * H * D * area, setup=_setup(name, impl, args)),
        Case(op=name, impl="sdpa", group=group, pass_="fwd", suites=frozenset(suites), params=params,
             flops=4.0 * B * H * D * dense, setup=_setup(name, "sdpa", args), baseline=True),
    ]


def cases() -> list[Case]:
    """Default: one cheap N=4096 case (PSA); full and sparse: both mechanisms at N=16384 (and causal)."""
    big = {"full", "sparse"}
    grid = [
        ("pyramid_sparse", "psa_q128_kv64_default", (4096, 128, 64, False), {"default", "full"}),
        ("pyramid_sparse", "psa_q128_kv64_default", (16384, 128, 64, False), big),
        ("pyramid_sparse", "psa_q128_kv64_causal", (16384, 128, 64, True), big),
        ("hyper_attention", "hyper_b256_m256", (16384, 256, 256, 4096, False), big),
        ("hyper_attention", "hyper_b256_m256_causal", (16384, 256, 256, 4096, True), big),
    ]
    out = []
    for name, label, args, suites in grid:
        out.extend(comparison(name, label, args, suites))
    return out
