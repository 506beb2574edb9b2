"""``sequence`` suite cases for the layer-spec hybrids and Spatial-Mamba's state fusion.

* MiniCPM-SALA (arXiv 2602.11761) and Hydra (arXiv 2508.15099) stacks, causal, fwd, B=1, N=1024, C=128,
  4 heads, fp32 (fwd only: the S6 layers' backward, dsf_equivalence's recurrence, takes minutes at this size),
  their module default specs (SALA ``A|L|L|L``: MoBA block 64 top-4 + lightning chunk 64;
  Hydra ``S|S|S|S+A``: S6 state 16 + S2 attention block 64), each vs four layers of causal dense SDPA with
  the same projections' width (group ``hybrid4/N=1024``).
* Spatial-Mamba SASF (arXiv 2410.15091), fwd, B=1, 32x32 image, C=64, state 4, dilations (1, 3, 5), fp32:
  the chunked backend (chunks of 16 tokens) vs the token-by-token reference (group ``spatial_mamba/32x32``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, module_pass, pass_fn

HN, HC, HH = 1024, 128, 4


def _hybrid_setup(name: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak

        torch.manual_seed(0)
        x = torch.randn(1, HN, HC)
        if name == "sdpa":
            qkv = [torch.nn.Linear(HC, 3 * HC) for _ in range(4)]

            def run(x: torch.Tensor) -> torch.Tensor:
                for lin in qkv:
                    q, k, v = lin(x).view(1, HN, 3, HH, HC // HH).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
                    x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
                return x

            return Runner(run=module_pass(run, x, "fwd"))
        m = ak.get(name, dim=HC, num_heads=HH, causal=True)
        return Runner(run=module_pass(m, x, "fwd"))

    return setup


def hybrid_cases() -> list[Case]:
    params = (("N", HN), ("B", 1), ("C", HC), ("H", HH), ("layers", 4), ("dtype", "float32"))
    dense = 4 * 4.0 * HN * (HN + 1) / 2 * HC  # four causal softmax layers
    return [Case(op="hybrid_stack", impl=impl, group=f"hybrid4/N={HN}", pass_="fwd",
                 suites=frozenset({"sequence"}), params=params, flops=dense,
                 setup=_hybrid_setup(impl), baseline=impl == "sdpa")
            for impl in ("sala_hybrid", "hydra_hybrid", "sdpa")]


def _sasf_setup(impl: str, side: int) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.ops.sequence.spatial_mamba import spatial_mamba_fusion

        g = torch.Generator().manual_seed(0)
        C, n = 64, 4
        x = torch.randn(1, side, side, C, generator=g)
        dt = 0.1 * torch.rand(1, side, side, C, generator=g)
        A = -torch.rand(C, n, generator=g)
        Bm, Cm = (torch.randn(1, side, side, n, generator=g) for _ in range(2))
        w = torch.randn(3, C, 3, 3, generator=g) / 27
        return Runner(run=pass_fn(lambda: spatial_mamba_fusion(x, dt, A, Bm, Cm, None, w, backend=impl), "fwd"))

    return setup


def spatial_mamba_cases() -> list[Case]:
    side, C, n = 32, 64, 4
    params = (("Y", side), ("X", side), ("C", C), ("state", n), ("dilations", "1,3,5"), ("dtype", "float32"))
    flops = float(side * side * C * n * (6 + 18 * 3 + 2))
    return [Case(op="spatial_mamba_fusion", impl=impl, group=f"spatial_mamba/{side}x{side}", pass_="fwd",
                 suites=frozenset({"sequence"}), params=params, flops=flops, setup=_sasf_setup(impl, side),
                 baseline=impl == "reference") for impl in ("chunked", "reference")]


def cases() -> list[Case]:
    return hybrid_cases() + spatial_mamba_cases()
