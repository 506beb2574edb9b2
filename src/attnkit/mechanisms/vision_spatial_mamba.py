"""Spatial-Mamba: Effective Visual State Space Models via Structure-aware State Fusion (arXiv 2410.15091).

The token mixer: projections around :func:`~attnkit.ops.sequence.spatial_mamba.spatial_mamba_fusion` (a
selective scan over the raster order whose states are fused over dilated 3x3 neighbourhoods before read-out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.sequence.spatial_mamba import spatial_mamba_fusion
from attnkit.reference.naive_sequence5 import naive_spatial_mamba_module
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, int_option, register


def _flops(cfg: dict) -> float:
    B, (Y, X), C, n = cfg["batch"], cfg["input_size"], cfg["dim"], cfg["state"]
    L, R = Y * X, len(cfg.get("dilations", (1, 3, 5)))
    proj = 2 * B * L * C * (2 * C + 2 * n) + 2 * B * L * C * C
    return float(proj + B * L * C * n * (6 + 18 * R + 2))


_DEFAULT = {"dim": 32, "state": 4, "dilations": (1, 3, 5), "fusion_init": "delta"}
_TINY = {"dim": 4, "state": 2, "dilations": (1, 2)}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "state": c["state"], "dilations": tuple(c["dilations"]),
            "fusion_init": c.get("fusion_init", "delta"), "chunk_size": c.get("chunk_size", 16)}


@register(
    name="spatial_mamba_fusion", family=Family.VISION,
    paper=Paper("Spatial-Mamba: Effective Visual State Space Models via Structure-aware State Fusion",
                "2410.15091", 2025),
    patterns=("noncausal-self",), complexity="O(N C n (1 + 9 R))", flops=_flops, options=_options,
    reference=naive_spatial_mamba_module, functional=spatial_mamba_fusion, default_config=_DEFAULT,
    tiny_config=_TINY, default_input={"batch": 2, "input_size": (8, 8)}, tiny_input={"batch": 1, "input_size": (3, 4)},
    input_kind=InputKind.IMAGE,
    notes="One unidirectional selective scan over the raster order (Mamba's Euler B_bar = dt B, diagonal A per "
          "channel, S4D-real init), states fused by depthwise 3x3 kernels at dilations 1, 3, 5 with replicate "
          "padding (the released code's padding); one kernel per (dilation, channel), shared by the channel's "
          "n state entries; the released code's per-dilation scalar alpha is folded into the kernels. "
          "fusion_init='delta' (default) starts as the plain scan (centre 1 at dilation 1, zeros elsewhere); "
          "'ones' is the released code's all-ones init with alpha = 1. No depthwise input conv, gate branch or "
          "output norm of the full Spatial-Mamba block: in_proj -> op -> out_proj only.",
)
class SpatialMambaMixer(nn.Module):
    """Spatial-Mamba token mixer on a channels-last image.

    Args:
        dim: ``C``; state: ``n`` per channel; dilations: fusion dilations (``R`` kernels);
        fusion_init: ``"delta"`` (plain scan at init) or ``"ones"`` (the released code's init);
        chunk_size: scan chunk of the fast path.

    Shapes:
        ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Example:
        >>> y = SpatialMambaMixer(64, state=4)(torch.randn(2, 14, 14, 64))
    """

    def __init__(self, dim: int, state: int = 4, *, dilations: tuple[int, ...] = (1, 3, 5),
                 fusion_init: str = "delta", chunk_size: int = 16):
        super().__init__()
        self.dim, self.state = int_option(self, "dim", dim, 1), int_option(self, "state", state, 1)
        if not isinstance(dilations, (tuple, list)) or not dilations:
            raise ValueError(f"{type(self).__name__}: dilations must be a non-empty tuple of ints, got {dilations!r}")
        self.dilations = tuple(int_option(self, "dilations entry", d, 1) for d in dilations)
        choice_option(self, "fusion_init", fusion_init, ("delta", "ones"))
        self.chunk_size = int_option(self, "chunk_size", chunk_size, 1)
        self.in_proj = nn.Linear(dim, 2 * dim + 2 * state)
        self.out_proj = nn.Linear(dim, dim)
        # S4D-real: A = -exp(a_log) = -(1..n) per channel
        self.a_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = nn.Parameter(torch.ones(dim))
        fusion = torch.ones(len(self.dilations), dim, 3, 3)
        if fusion_init == "delta":
            fusion.zero_()
            fusion[0, :, 1, 1] = 1.0
        self.fusion = nn.Parameter(fusion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, Y, X, C)", channels=self.dim, meta="the scan runs chunk by chunk")
        C, n = self.dim, self.state
        xs, dt, Bm, Cm = self.in_proj(x).split([C, C, n, n], dim=-1)
        y = spatial_mamba_fusion(xs, F.softplus(dt), -torch.exp(self.a_log.to(x.dtype)), Bm, Cm, self.D.to(x.dtype),
                                 self.fusion.to(x.dtype), dilations=self.dilations, chunk_size=self.chunk_size)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, state={self.state}, dilations={self.dilations}, chunk={self.chunk_size}"
