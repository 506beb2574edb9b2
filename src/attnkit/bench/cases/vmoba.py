"""Cases for VMoBA (arXiv 2506.23858) vs dense SDPA on a 16 x 32 x 32 video grid (``full`` suite).

Times the attention core (routing included, projections excluded) of each partition mode
with the paper's threshold ``tau = 0.25`` on random q, k, v, interleaved with dense SDPA on
the same tensors. ``flops`` counts the selected pairs: the density is the fraction measured
once for this seed and shape (about 0.20; measuring it at discovery would cost a routing pass),
``ideal_speedup = 1 / density``.
Shapes: B=1, H=8, D=64, fp32, fwd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn

B, H, D = 1, 8, 64
GRID = (16, 32, 32)
N = GRID[0] * GRID[1] * GRID[2]
TAU = 0.25
# measured selected fraction of (query, key) pairs for seed 0 at tau = 0.25 (see module docstring)
_DENSITY = {"1d": 0.216, "2d": 0.204, "3d": 0.199}


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, N, H, D, generator=g) for _ in range(3))  # (B, N, H, D)


def _config():
    from attnkit.ops.routed.vmoba import VMoBAConfig

    return VMoBAConfig(block_1d=2, block_2d=(8, 8), block_3d=(4, 8, 8))  # 8, 16, 64 blocks


def _setup(mode: str, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        q, k, v = _qkv()
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)

            run = pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh), "fwd")

            return Runner(run=run)
        from attnkit.ops.routed.vmoba import vmoba_attention

        run = pass_fn(lambda: vmoba_attention(q, k, v, GRID, mode=mode, config=_config(), threshold=TAU), "fwd")

        def check():
            with torch.no_grad():
                out, sel = vmoba_attention(q, k, v, GRID, mode=mode, config=_config(), threshold=TAU,
                                           return_layout=True)  # sel (B, H, N, n)
            from attnkit.ops.routed.vmoba import block_shape, partition_ids

            ids = partition_ids(GRID, block_shape(GRID, mode, _config()))
            rows = torch.linspace(0, N - 1, 32).long()
            s = torch.einsum("rhd,khd->hrk", q[0, rows].double(), k[0].double()) * D ** -0.5  # (H, R, N)
            s = s.masked_fill(~sel[0][:, rows][:, :, ids], float("-inf"))
            ref = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), v[0].double())
            got = out[0, rows].double()
            return (got - ref).abs().max().item(), ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()

        return Runner(run=run, check=check)

    return setup


def cases() -> list[Case]:
    """``full`` only: the three partition modes at 16 x 32 x 32 (N = 16384)."""
    out = []
    for mode in ("1d", "2d", "3d"):
        density = _DENSITY[mode]
        params = (("N", N), ("grid", "x".join(map(str, GRID))), ("B", B), ("H", H), ("D", D), ("dtype", "float32"),
                  ("config", f"vmoba_{mode}_tau{TAU}"), ("density", density),
                  ("ideal_speedup", round(1 / density, 3)), ("baseline_group", f"full/N={N}"))
        group = f"vmoba_{mode}_tau{TAU}/N={N}"
        out += [
            Case(op="vmoba", impl="dispatch", group=group, pass_="fwd", suites=frozenset({"full"}), params=params,
                 flops=4.0 * B * H * D * N * N * density, setup=_setup(mode, "dispatch")),
            Case(op="vmoba", impl="sdpa", group=group, pass_="fwd", suites=frozenset({"full"}), params=params,
                 flops=4.0 * B * H * D * N * N, setup=_setup(mode, "sdpa"), baseline=True),
        ]
    return out
