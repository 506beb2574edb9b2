"""The ``sequence`` suite: the remaining sequence mechanisms' acceptance figures.

* Titans' memory (arXiv 2501.00663), fwd+bwd, B=1, H=4, D=32, MLP memory (hidden 64), chunk 64, fp32:
  the chunked form at N=4096 and N=16384 (group ``titans_chunked_scaling``: the ratio t(16384) / t(4096)
  is the linearity figure, acceptance <= 4.6) and the token-by-token recurrence at N=16384 (group
  ``titans/N=16384``, the recurrence is the baseline: the speedup is chunked vs recurrent, acceptance
  >= chunk / 4 = 16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn
from attnkit.bench.suites import Suite, register_suite

SEQUENCE = register_suite(Suite(
    "sequence", "sequence mechanisms: Titans chunked vs token recurrence and its N-scaling (fwd+bwd, N=4K/16K); "
                "(the recurrence at 16K takes minutes)",
    repeat=2, min_repeat=1, warmup_s=0.0, unit_budget_s=60.0, case_timeout_s=900.0, memory=False))

TH, TD, TE, TCHUNK = 4, 32, 64, 64


def _titans_inputs(n: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (F.normalize(torch.randn(1, n, TH, TD, generator=g), dim=-1).requires_grad_() for _ in range(3))
    a, e, t = (0.1 * torch.rand(1, n, TH, generator=g) for _ in range(3))
    ws = ((torch.randn(TH, TD, TE, generator=g) * TD ** -0.5).requires_grad_(),
          (torch.randn(TH, TE, TD, generator=g) * TE ** -0.5).requires_grad_())
    return (q, k, v, a, e, t), ws


def _titans_setup(n: int, backend: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.memory.titans import titans_memory

        (q, k, v, a, e, t), ws = _titans_inputs(n)

        def fn():
            return titans_memory(q, k, v, a, e, t, ws, chunk_size=TCHUNK, backend=backend)

        run = pass_fn(fn, "fwd+bwd", (q, k, v, *ws), torch.ones(1, n, TH, TD))
        return Runner(run=run)

    return setup


def _titans_flops(n: int) -> float:
    per_token = 2 * TH * (TD * TE * 2) * 3 + 2 * TH * TCHUNK * (TD + TE) * 2
    return float(n * per_token)


def titans_cases() -> list[Case]:
    out = []
    suites = frozenset({"sequence"})
    for n in (4096, 16384):
        params = (("N", n), ("B", 1), ("H", TH), ("D", TD), ("E", TE), ("chunk", TCHUNK), ("dtype", "float32"))
        out.append(Case(op="titans_memory", impl="chunked", group="titans_chunked_scaling", pass_="fwd+bwd",
                        suites=suites, params=params, flops=_titans_flops(n), setup=_titans_setup(n, "chunked"),
                        baseline=n == 4096))
    n = 16384
    params = (("N", n), ("B", 1), ("H", TH), ("D", TD), ("E", TE), ("chunk", TCHUNK), ("dtype", "float32"))
    for impl in ("chunked", "recurrent"):
        out.append(Case(op="titans_memory", impl=impl, group=f"titans/N={n}", pass_="fwd+bwd", suites=suites,
                        params=params, flops=_titans_flops(n), setup=_titans_setup(n, impl),
                        baseline=impl == "recurrent"))
    return out


def cases() -> list[Case]:
    return titans_cases()
