"""Cases of the ``cross`` suite for the cross mechanisms registered in a second pass: Cambrian-1's Spatial
Vision Aggregator ("Cambrian-1: A Fully Open, Vision-Centric Exploration of Multimodal LLMs", arXiv 2406.16860).

Groups and implementations (``Case.impl``):

* ``cell_local/L=24/maps=48,24`` (B=2, H=16, D=64, fp32, fwd and fwd+bwd; a 48 x 48 and a 24 x 24 map, the
  paper's 576 grid queries over two encoders): ``cellwise`` = ``cell_local_attention`` (one dense attention
  per query over its cells, batched) against the baseline ``sdpa_masked`` = one SDPA of every query over all
  the maps' pixels with the dense cell mask (what a caller without the op would write).
* ``module/cambrian_sva/noncausal-self``: the registered module's default example (a 48 x 48 map pooled to
  24 x 24 tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_with_random_grad
from attnkit.bench.cases.cross import module_setup
from attnkit.bench.flops import attention_flops

B, H, D, L, SIDES = 2, 16, 64, 24, (48, 24)


def _cell_mask(grid: int, sides: tuple[int, ...]) -> torch.Tensor:
    """``(L*L, sum side^2)`` bool: query ``(i, j)`` sees pixel ``(y, x)`` of a map iff ``y // m == i, x // m == j``."""
    qi = torch.arange(grid * grid)
    cols = []
    for s in sides:
        m = s // grid
        y, x = torch.arange(s).repeat_interleave(s), torch.arange(s).repeat(s)           # raster pixels
        cols.append(((y // m) * grid + x // m)[None, :] == qi[:, None])                  # (L*L, s*s)
    return torch.cat(cols, 1)


def cell_setup(impl: str, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.cross.cell_local import cell_local_attention

        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, L * L, H, D, generator=g)
        feats = [(torch.randn(B, s, s, H, D, generator=g), torch.randn(B, s, s, H, D, generator=g)) for s in SIDES]
        inputs = (q, *[t for kv in feats for t in kv])
        if pass_ != "fwd":
            for t in inputs:
                t.requires_grad_()
        if impl == "cellwise":
            def fn():
                return cell_local_attention(q, feats, L)
        else:
            mask = _cell_mask(L, SIDES)

            def fn():
                k = torch.cat([k.flatten(1, 2) for k, _ in feats], 1)                # (B, sum s^2, H, D)
                v = torch.cat([v.flatten(1, 2) for _, v in feats], 1)
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=mask)
                return o.transpose(1, 2)                                              # (B, L*L, H, D)

        def check():
            ref = cell_local_attention(q.detach().double(), [(k.detach().double(), v.detach().double())
                                                             for k, v in feats], L, backend="reference")
            with torch.no_grad():
                got = fn().double()
            return (got - ref).abs().max().item(), ((got - ref).norm() / ref.norm()).item()

        return Runner(run=pass_with_random_grad(fn, pass_, inputs), check=check,
                      check_vs="cell_local_attention reference, fp64")

    return setup


def cases() -> list[Case]:
    import attnkit as ak

    out = []
    suites = frozenset({"cross"})
    area = L * L * sum((s // L) ** 2 for s in SIDES)          # useful pairs: each query's cells only
    maps = ",".join(map(str, SIDES))
    params = (("B", B), ("L", L), ("maps", maps), ("H", H), ("D", D), ("dtype", "float32"))
    for pass_ in ("fwd", "fwd+bwd"):
        for impl in ("cellwise", "sdpa_masked"):
            out.append(Case(op="cell_local_attention", impl=impl, group=f"cell_local/L={L}/maps={maps}",
                            pass_=pass_, suites=suites, params=params, flops=attention_flops(area, H, D, batch=B),
                            setup=cell_setup(impl, pass_), baseline=impl == "sdpa_masked"))
        spec = ak.info("cambrian_sva")
        out.append(Case(op=spec.name, impl="module", group="module/cambrian_sva/noncausal-self", pass_=pass_,
                        suites=suites, params=(("pattern", "noncausal-self"), ("dtype", "float32")),
                        flops=float(spec.flops(spec.config())), setup=module_setup(spec.name, "noncausal-self", pass_)))
    return out
