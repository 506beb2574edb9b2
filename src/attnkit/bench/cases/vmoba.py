"""Cases for VMoBA (arXiv 2506.23858) vs dense SDPA on a 16 x 32 x 32 video grid (``full``, ``sparse``).

Times the attention core (routing included, projections excluded) of each partition mode
with the paper's threshold ``tau = 0.25`` on random q, k, v, interleaved with dense SDPA on
the same tensors. The selection depends on the data, so setup runs the op once with
``return_layout=True`` and counts the (query, key) pairs it selected: ``flops`` (4 * pairs * D per
head), ``density`` (pairs over N^2, averaged over heads) and ``ideal_speedup = 1 / density`` are
that count (``Runner.flops`` / ``Runner.params``); the case's discovery-time ``flops`` is the dense
upper bound. The same run's output is checked against fp64 attention under its own selection.
Shapes: B=1, H=8, D=64, fp32, fwd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn

B, H, D = 1, 8, 64
GRID = (16, 32, 32)
TAU = 0.25


def _qkv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, H, D, generator=g) for _ in range(3))  # (B, N, H, D)


def _config():
    from attnkit.ops.routed.vmoba import VMoBAConfig

    return VMoBAConfig(block_1d=2, block_2d=(8, 8), block_3d=(4, 8, 8))  # 8, 16, 64 blocks at 16 x 32 x 32


def selected_pairs(sel: torch.Tensor, ids: torch.Tensor) -> float:
    """(query, key) pairs a block selection ``sel (B, H, N, n)`` attends, per (batch, head) on average;
    ``ids (N,)`` is each token's block (blocks may differ in size at the grid's edges)."""
    sizes = torch.bincount(ids, minlength=sel.shape[-1]).to(torch.float64)  # (n,) tokens per block
    return float((sel.to(torch.float64) * sizes).sum() / (sel.shape[0] * sel.shape[1]))


def _setup(grid: tuple[int, int, int], mode: str, impl: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        n = math.prod(grid)
        q, k, v = _qkv(n)
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)

            run = pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh), "fwd")

            return Runner(run=run)
        from attnkit.ops.routed.vmoba import block_shape, partition_ids, vmoba_attention

        cfg = _config()
        run = pass_fn(lambda: vmoba_attention(q, k, v, grid, mode=mode, config=cfg, threshold=TAU), "fwd")
        with torch.no_grad():
            out, sel = vmoba_attention(q, k, v, grid, mode=mode, config=cfg, threshold=TAU,
                                       return_layout=True)  # sel (B, H, N, n) raster rows
        ids = partition_ids(grid, block_shape(grid, mode, cfg))  # (N,) raster token -> block
        area = selected_pairs(sel, ids)
        density = area / n / n

        def check():
            rows = torch.linspace(0, n - 1, 32).long()
            s = torch.einsum("rhd,khd->hrk", q[0, rows].double(), k[0].double()) * D ** -0.5  # (H, R, N)
            s = s.masked_fill(~sel[0][:, rows][:, :, ids], float("-inf"))
            ref = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1), v[0].double())
            got = out[0, rows].double()
            return (got - ref).abs().max().item(), ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()

        return Runner(run=run, check=check, check_vs="fp64 attention under the op's own selection, 32 rows",
                      flops=4.0 * B * H * D * area,
                      params={"density": round(density, 6), "ideal_speedup": round(1 / density, 3)})

    return setup


def comparisons(grid: tuple[int, int, int] = GRID, modes: tuple[str, ...] = ("1d", "2d", "3d"),
                suites: tuple[str, ...] = ("full", "sparse")) -> list[Case]:
    """Each partition mode on ``grid`` vs dense SDPA (two cases per mode)."""
    n = math.prod(grid)
    out = []
    for mode in modes:
        params = (("N", n), ("grid", "x".join(map(str, grid))), ("B", B), ("H", H), ("D", D), ("dtype", "float32"),
                  ("config", f"vmoba_{mode}_tau{TAU}"), ("baseline_group", f"full/N={n}"))
        group = f"vmoba_{mode}_tau{TAU}/N={n}"
        dense = 4.0 * B * H * D * n * n
        out += [
            Case(op="vmoba", impl="dispatch", group=group, pass_="fwd", suites=frozenset(suites), params=params,
                 flops=dense, setup=_setup(grid, mode, "dispatch")),  # the selection's count replaces it in setup
            Case(op="vmoba", impl="sdpa", group=group, pass_="fwd", suites=frozenset(suites), params=params,
                 flops=dense, setup=_setup(grid, mode, "sdpa"), baseline=True),
        ]
    return out


def cases() -> list[Case]:
    """``full`` and ``sparse``: the three partition modes at 16 x 32 x 32 (N = 16384)."""
    return comparisons()
