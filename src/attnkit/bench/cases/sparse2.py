"""Cases for Sparsifiner (arXiv 2303.13755) and Orion-MSP (arXiv 2511.02818), following ``cases/sparse_more.py``.

Each group times one mechanism's attention core (connectivity included: Sparsifiner's top-k of ``C U`` from a
given predictor output, Orion-MSP's cached static mask; projections excluded) against dense SDPA on the same
q, k, v. ``density`` is the attended pairs over the dense area and ``ideal_speedup = 1 / density``; the report
gives the fraction of it reached. Checks: 32 rows against float64 masked attention on the op's own connectivity.
Shapes: B=1, H=8, D=64, fp32, fwd.

* ``sparsifiner`` block granularity at N=16384, keep rate 0.25 (64 of 256 key blocks of 64 per query block),
  predictor rank R=128 (the paper's N/8 would make ``C`` alone 1 GiB at this length);
* ``sparsifiner`` token granularity (the paper's unstructured top-k) at N=4096: the kept pairs are scattered, so
  every 64 x 64 kernel tile holds some (computed pairs = the dense area at keep 0.25 on these inputs), and the
  top-k selection itself makes several elementwise passes over all N^2 predicted scores, so it is slower than
  dense SDPA on CPU (a fraction of about 0.01 of its ideal, measured on a busy machine);
* ``orion_msp`` at N=16384 with 64 special tokens, window 256 and 2 random key blocks of 64 per query block, and
  with the repository's defaults (6 specials, window 4, no random links: density 0.13%).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn

B, H, D = 1, 8, 64
SUITES = frozenset({"full", "sparse"})


def _qkv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, H, D, generator=g) for _ in range(3))  # (B, N, H, D)


def _predictor(n: int, r: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    coef = torch.softmax(torch.randn(B, n, H, r, generator=g) * 3, -1)  # (B, N, H, R)
    basis = torch.rand(r, n, generator=g)                               # (R, N)
    return coef, torch.where(basis > 0.5, basis, torch.zeros(()))


def _rows_check(out_fn, q, k, v, allowed_rows):
    """Max-abs and rel-RMSE of 32 output rows against float64 masked attention on ``allowed_rows(rows)``
    ``(H, 32, N)``."""
    n = q.shape[1]
    rows = torch.linspace(0, n - 1, 32).long()
    s = torch.einsum("rhd,khd->hrk", q[0, rows].double(), k[0].double()) * D ** -0.5  # (H, 32, N)
    s = s.masked_fill(~allowed_rows(rows), float("-inf"))
    ref = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), v[0].double())          # (32, H, D)
    got = out_fn()[0, rows].double()
    return (got - ref).abs().max().item(), ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def _sparsifiner(n: int, keep: float, gran: str, r: int):
    from attnkit.ops.routed.sparsifiner import block_connectivity, sparsifiner_attention, token_connectivity

    q, k, v = _qkv(n)
    coef, basis = _predictor(n, r)
    top_k = round(keep * n)

    def fn():
        return sparsifiner_attention(q, k, v, coef, basis, top_k=top_k, granularity=gran, block_size=64)

    def allowed_rows(rows):
        if gran == "token":
            return token_connectivity(coef[:, rows], basis, top_k)[0]                 # (H, 32, N)
        lay = block_connectivity(coef, basis, top_k, 64)[0]                           # (H, nqb, nkb)
        return lay[:, rows // 64].repeat_interleave(64, -1)[..., :n]

    return fn, (q, k, v), lambda: _rows_check(fn, q, k, v, allowed_rows), top_k / n


def _orion(n: int, ns: int, w: int, nr: int, rb: int):
    from attnkit.ops.routed.orion import orion_msp_attention, orion_msp_mask

    q, k, v = _qkv(n)
    mask = orion_msp_mask(n, ns, w, nr, rb, 0)

    def fn():
        return orion_msp_attention(q, k, v, num_special=ns, window=w, num_random=nr, random_block=rb)

    def allowed_rows(rows):
        return mask.tile(0, n, torch.arange(n), n, n)[rows][None]  # (1, 32, N)

    return fn, (q, k, v), lambda: _rows_check(fn, q, k, v, allowed_rows), mask.density(n, n)


_MAKERS = {"sparsifiner": _sparsifiner, "orion_msp": _orion}


def _setup(name: str, impl: str, args: tuple) -> Callable[[], Runner]:
    def setup() -> Runner:
        fn, (q, k, v), check, _ = _MAKERS[name](*args)
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
            return Runner(run=pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh), "fwd"))

        def chk():
            with torch.no_grad():
                return check()

        # the first call builds the tile list / mask caches (Orion-MSP's static structure is built once)
        return Runner(run=pass_fn(fn, "fwd"), check=chk, first_call_is_oneoff=True)

    return setup


def _density(name: str, args: tuple) -> float:
    if name == "sparsifiner":
        return args[1]
    from attnkit.ops.routed.orion import orion_msp_mask

    n = args[0]
    return orion_msp_mask(n, *args[1:], 0).density(n, n)


def comparison(name: str, impl: str, label: str, args: tuple) -> list[Case]:
    """Mechanism ``name`` with its maker's ``args`` (N first) vs dense SDPA: two cases of group ``label/N=...``."""
    n = args[0]
    density = _density(name, args)
    params = (("N", n), ("B", B), ("H", H), ("D", D), ("dtype", "float32"), ("config", label),
              ("density", round(density, 6)), ("ideal_speedup", round(1 / density, 3)),
              ("baseline_group", f"full/N={n}"))
    group = f"{label}/N={n}"
    dense = n * n
    return [
        Case(op=name, impl=impl, group=group, pass_="fwd", suites=SUITES, params=params,
             flops=4.0 * B * H * D * density * dense, setup=_setup(name, impl, args)),
        Case(op=name, impl="sdpa", group=group, pass_="fwd", suites=SUITES, params=params,
             flops=4.0 * B * H * D * dense, setup=_setup(name, "sdpa", args), baseline=True),
    ]


def cases() -> list[Case]:
    grid = [
        ("sparsifiner", "gather", "sparsifiner_block64_keep0.25_r128", (16384, 0.25, "block", 128)),
        ("sparsifiner", "tiles", "sparsifiner_token_keep0.25_r128", (4096, 0.25, "token", 128)),
        ("orion_msp", "mask", "orion_s64_w256_rand2x64", (16384, 64, 256, 2, 64)),
        ("orion_msp", "mask", "orion_defaults_s6_w4", (16384, 6, 4, 0, 1)),
    ]
    out = []
    for name, impl, label, args in grid:
        out.extend(comparison(name, impl, label, args))
    return out
