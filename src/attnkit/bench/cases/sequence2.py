"""``sequence`` suite cases for the second batch of sequence mechanisms.

* Combiner-Fixed (arXiv 2107.05768), fwd and fwd+bwd, B=1, H=8, D=64, fp32, segment 128 (``sqrt(N)``) at
  N=16384, non-causal and causal, each vs dense SDPA (causal SDPA for the causal case) on the same q, k, v
  (groups ``combiner_s128/N=16384`` and ``combiner_s128_causal/N=16384``). The combiner runs with
  ``backend=None`` (impl ``auto``: on a CPU with the compiled kernel that is the ``tiles`` backend, one
  tile-kernel call over ``[keys, summaries]``). ``density`` counts direct, summary and pooling score pairs
  over the dense area (``N^2``, or ``N (N + 1) / 2`` causal): the report's "of ideal" column of the fwd rows
  is the acceptance figure (>= 0.5).
* DSF (arXiv 2405.15731), fwd, fp32, N=2048: an S6 system (B=1, 64 channels as heads, state 16, d=1) on the
  recurrent backend vs the step-by-step reference (group ``dsf_s6/N=2048``), and a linear-attention system
  (B=1, H=4, n=d=64) on ak.linear_attention vs chunked (group ``dsf_linear/N=2048``).
* Hierarchical attention (arXiv 2509.15448), fwd, B=1, H=8, D=64, fp32, N=16384, branching 16 (balanced tree),
  gather (DP) vs dense SDPA (group ``hierarchical_b16/N=16384``; ``density`` = candidate keys per query / N).
* iLLaMA attention (arXiv 2404.06773), fwd, B=8, N=197, H=3, D=64, fp32: alpha 0 (causal through ak.attention)
  and alpha 0.5 (soft mask, materialised) vs causal SDPA (group ``llama_vit/N=197``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn, pass_with_random_grad
from attnkit.bench.flops import pass_flops

CB, CH, CD = 1, 8, 64


def _combiner_setup(n: int, segment: int, causal: bool, impl: str, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.combiner import combiner_attention

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(CB, n, CH, CD, generator=g) for _ in range(3))
        if impl == "sdpa":
            q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
        if pass_ != "fwd":
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        if impl == "sdpa":
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        else:
            fn = lambda: combiner_attention(q, k, v, segment=segment, causal=causal)  # noqa: E731
        return Runner(run=pass_with_random_grad(fn, pass_, (q, k, v)))

    return setup


def combiner_cases() -> list[Case]:
    from attnkit.ops.sequence.combiner import combiner_density

    out = []
    n, s = 16384, 128
    for causal in (False, True):
        d = combiner_density(n, s, causal)
        dense = n * (n + 1) / 2 if causal else n * n
        label = f"combiner_s{s}{'_causal' if causal else ''}"
        params = (("N", n), ("B", CB), ("H", CH), ("D", CD), ("segment", s), ("dtype", "float32"),
                  ("density", round(d, 6)), ("ideal_speedup", round(1 / d, 3)))
        for pass_ in ("fwd", "fwd+bwd"):
            for impl in ("auto", "sdpa"):  # auto: the dispatcher's choice (tiles on a CPU with the kernel)
                area = d * dense if impl == "auto" else dense
                out.append(Case(op="combiner", impl=impl, group=f"{label}/N={n}", pass_=pass_,
                                suites=frozenset({"sequence"}), params=params,
                                flops=pass_flops(4.0 * CB * CH * CD * area, pass_),
                                setup=_combiner_setup(n, s, causal, impl, pass_), baseline=impl == "sdpa"))
    return out


def _dsf_setup(kind: str, n: int, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.dsf import dsf_from_linear_attention, dsf_from_s6, run_dsf

        g = torch.Generator().manual_seed(0)
        if kind == "s6":
            x, dt = torch.randn(1, n, 64, generator=g), 0.1 * torch.rand(1, n, 64, generator=g)
            A = -torch.rand(64, 16, generator=g)
            sys = dsf_from_s6(x, dt, A, torch.randn(1, n, 16, generator=g), torch.randn(1, n, 16, generator=g))
        else:
            q, k, v = (torch.randn(1, n, 4, 64, generator=g) * 0.1 for _ in range(3))
            sys = dsf_from_linear_attention(q, k, v, decay=torch.full((4,), 0.99))
        return Runner(run=pass_fn(lambda: run_dsf(sys, backend=impl), "fwd"))

    return setup


def dsf_cases() -> list[Case]:
    n = 2048
    out = []
    for kind, impls, base, flops in (("s6", ("recurrent", "reference"), "reference", 6.0 * n * 64 * 16),
                                     ("linear", ("linear_attention", "chunked"), "chunked", 4.0 * n * 4 * 64 * 64)):
        params = (("N", n), ("B", 1), ("form", kind), ("dtype", "float32"))
        for impl in impls:
            out.append(Case(op="dsf_scan", impl=impl, group=f"dsf_{kind}/N={n}", pass_="fwd",
                            suites=frozenset({"sequence"}), params=params, flops=flops,
                            setup=_dsf_setup(kind, n, impl), baseline=impl == base))
    return out


def _hier_setup(n: int, b: int, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.hierarchical import hierarchical_attention, uniform_hierarchy

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(CB, n, CH, CD, generator=g) for _ in range(3))
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
            return Runner(run=pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh), "fwd"))
        tree = uniform_hierarchy(n, b)
        return Runner(run=pass_fn(lambda: hierarchical_attention(q, k, v, tree), "fwd"))

    return setup


def hierarchical_cases() -> list[Case]:
    from attnkit.ops.sequence.hierarchical import hierarchical_density, uniform_hierarchy

    n, b = 16384, 16
    d = hierarchical_density(uniform_hierarchy(n, b))
    params = (("N", n), ("B", CB), ("H", CH), ("D", CD), ("branching", b), ("dtype", "float32"),
              ("density", round(d, 6)), ("ideal_speedup", round(1 / d, 3)))
    return [Case(op="hierarchical_attention", impl=impl, group=f"hierarchical_b{b}/N={n}", pass_="fwd",
                 suites=frozenset({"sequence"}), params=params,
                 flops=4.0 * CB * CH * CD * n * n * (d if impl == "gather" else 1.0),
                 setup=_hier_setup(n, b, impl), baseline=impl == "sdpa") for impl in ("gather", "sdpa")]


def _llama_setup(impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.llama_vit import soft_causal_attention

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(8, 197, 3, 64, generator=g) for _ in range(3))
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
            return Runner(run=pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), "fwd"))
        alpha = 0.0 if impl == "causal" else 0.5
        return Runner(run=pass_fn(lambda: soft_causal_attention(q, k, v, alpha=alpha), "fwd"))

    return setup


def llama_vit_cases() -> list[Case]:
    params = (("N", 197), ("B", 8), ("H", 3), ("D", 64), ("dtype", "float32"))
    return [Case(op="llama_vit_causal", impl=impl, group="llama_vit/N=197", pass_="fwd",
                 suites=frozenset({"sequence"}), params=params, flops=4.0 * 8 * 3 * 64 * 197 * 197,
                 setup=_llama_setup(impl), baseline=impl == "sdpa") for impl in ("causal", "soft_0.5", "sdpa")]


def cases() -> list[Case]:
    return combiner_cases() + dsf_cases() + hierarchical_cases() + llama_vit_cases()
