"""``sequence`` suite cases for the second batch of sequence mechanisms.

* Combiner-Fixed (arXiv 2107.05768), fwd, B=1, H=8, D=64, fp32, segment 128 (``sqrt(N)``) at N=16384,
  non-causal and causal, each vs dense SDPA on the same q, k, v (groups ``combiner_s128/N=16384`` and
  ``combiner_s128_causal/N=16384``). ``density`` counts direct, summary and pooling score pairs over the dense
  area: the report's "of ideal" column is the acceptance figure (>= 0.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn

CB, CH, CD = 1, 8, 64


def _combiner_setup(n: int, segment: int, causal: bool, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.combiner import combiner_attention

        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(CB, n, CH, CD, generator=g) for _ in range(3))
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
            return Runner(run=pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), "fwd"))
        return Runner(run=pass_fn(lambda: combiner_attention(q, k, v, segment=segment, causal=causal), "fwd"))

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
        for impl in ("segmented", "sdpa"):
            area = d * dense if impl == "segmented" else dense
            out.append(Case(op="combiner", impl=impl, group=f"{label}/N={n}", pass_="fwd",
                            suites=frozenset({"sequence"}), params=params, flops=4.0 * CB * CH * CD * area,
                            setup=_combiner_setup(n, s, causal, impl), baseline=impl == "sdpa"))
    return out


def cases() -> list[Case]:
    return combiner_cases()
