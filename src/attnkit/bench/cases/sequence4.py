"""``sequence`` suite cases for graph-of-tokens routing, BAM and deconstructed attention.

* Graph-of-tokens routing (arXiv 2505.00792), fwd, B=2, N=1024, H=4, D=32, E=8 experts, top-2, fp32, causal:
  ``S P`` through ak.attention (values = routing probabilities) vs the explicit (N, N) graph (group
  ``got_route/N=1024``).
* BAM soft mixture of attention experts (arXiv 2408.08274), fwd, B=2, N=1024, C=256, H=4, E=4, fp32, causal:
  all experts in one ak.attention call, with separate and with shared K/V, vs one naive attention per expert
  (group ``bam_e4/N=1024``).
* Deconstructed attention (arXiv 2510.11602), fwd, B=1, N=2048, H=8, D=64, fp32, causal: form softmax
  (ak.attention), relu and taylor (materialised weights), uniform mixing (running mean) vs causal SDPA (group
  ``deconstructed/N=2048``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn


def _got_setup(n: int, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.got import got_route

        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, n, 8, generator=g)
        q, k = (torch.randn(2, n, 4, 32, generator=g) for _ in range(2))
        return Runner(run=pass_fn(lambda: got_route(logits, q, k, topk=2, causal=True, backend=impl).probs, "fwd"))

    return setup


def got_cases() -> list[Case]:
    n = 1024
    params = (("N", n), ("B", 2), ("H", 4), ("D", 32), ("E", 8), ("topk", 2), ("dtype", "float32"))
    return [Case(op="got_route", impl=impl, group=f"got_route/N={n}", pass_="fwd", suites=frozenset({"sequence"}),
                 params=params, flops=2.0 * 2 * 4 * n * n * (32 + 8) / 2, setup=_got_setup(n, impl),
                 baseline=impl == "reference") for impl in ("attention", "reference")]


def _bam_setup(n: int, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.bam import bam_attention

        g = torch.Generator().manual_seed(0)
        E, C, H = 4, 256, 4
        ekv = 1 if impl == "attention_kv_shared" else E
        w = lambda *s: torch.randn(*s, generator=g) * C ** -0.5  # noqa: E731
        x = torch.randn(2, n, C, generator=g)
        args = (x, w(C, E), w(E, C, C), w(ekv, C, C), w(ekv, C, C), w(E, C, C))
        backend = "reference" if impl == "reference" else "attention"
        return Runner(run=pass_fn(lambda: bam_attention(*args, num_heads=H, causal=True, backend=backend), "fwd"))

    return setup


def bam_cases() -> list[Case]:
    n, E, C = 1024, 4, 256
    params = (("N", n), ("B", 2), ("C", C), ("H", 4), ("E", E), ("dtype", "float32"))
    flops = 2 * (2.0 * n * C * C * 4 * E + 2.0 * E * n * n * C)  # projections + causal QK^T and PV
    return [Case(op="bam_attention", impl=impl, group=f"bam_e{E}/N={n}", pass_="fwd", suites=frozenset({"sequence"}),
                 params=params, flops=flops, setup=_bam_setup(n, impl), baseline=impl == "reference")
            for impl in ("attention", "attention_kv_shared", "reference")]


def _deconstructed_setup(n: int, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.deconstructed import deconstructed_attention

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, 8, 64, generator=g) for _ in range(3))
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
            return Runner(run=pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), "fwd"))
        kw = {"mixing": "uniform"} if impl == "uniform" else {"form": impl}
        return Runner(run=pass_fn(lambda: deconstructed_attention(q, k, v, causal=True, **kw), "fwd"))

    return setup


def deconstructed_cases() -> list[Case]:
    n = 2048
    params = (("N", n), ("B", 1), ("H", 8), ("D", 64), ("dtype", "float32"))
    return [Case(op="deconstructed_attention", impl=impl, group=f"deconstructed/N={n}", pass_="fwd",
                 suites=frozenset({"sequence"}), params=params,
                 flops=(8.0 * n * 64 if impl == "uniform" else 4.0 * 8 * 64 * n * n / 2),
                 setup=_deconstructed_setup(n, impl), baseline=impl == "sdpa")
            for impl in ("softmax", "relu", "taylor", "uniform", "sdpa")]


def cases() -> list[Case]:
    return got_cases() + bam_cases() + deconstructed_cases()
