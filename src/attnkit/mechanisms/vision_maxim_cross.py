"""MAXIM's cross-gating block: two feature maps gate each other with multi-axis spatial weights.

"MAXIM: Multi-Axis MLP for Image Processing", arXiv 2201.02973 (CVPR 2022), §3.2. The token mixing is
:func:`attnkit.ops.vision.cross_gating.multi_axis_spatial_weights` (built on ``axis_token_mixing``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.cross_gating import multi_axis_spatial_weights
from attnkit.reference.naive_vision_b import naive_maxim_cross_gating_module
from attnkit.registry import Family, InputKind, Paper, check_input, int_option, register


class SpatialGatingWeights(nn.Module):
    """MAXIM's ``GetSpatialGatingWeights``: LN -> Dense(C, 2C) -> GELU -> grid / block token dense -> Dense(2C, C).

    The token dense layers start as MAXIM's: weights ``N(0, 0.02^2)``, biases 1."""

    def __init__(self, dim: int, block_size: int, grid_size: int):
        super().__init__()
        self.block_size, self.grid_size = block_size, grid_size
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.grid_weight = nn.Parameter(torch.randn(grid_size ** 2, grid_size ** 2) * 0.02)
        self.grid_bias = nn.Parameter(torch.ones(grid_size ** 2))
        self.block_weight = nn.Parameter(torch.randn(block_size ** 2, block_size ** 2) * 0.02)
        self.block_bias = nn.Parameter(torch.ones(block_size ** 2))
        self.out_proj = nn.Linear(2 * dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = F.gelu(self.in_proj(self.norm(z)))                                          # (B, Y, X, 2C)
        w = multi_axis_spatial_weights(u, self.grid_weight, self.grid_bias, self.grid_size, self.block_weight,
                                       self.block_bias, self.block_size)
        return self.out_proj(w)                                                          # (B, Y, X, C)


def _flops(cfg: dict) -> float:
    Y, X = cfg["input_size"]
    b, g = cfg["block_size"], cfg["grid_size"]
    if Y % b or X % b or Y % g or X % g:
        raise ValueError(f"maxim_cross_gating: input {(Y, X)} is not a multiple of block_size {b} and grid_size {g}")
    n, c = cfg.get("batch", 1) * Y * X, cfg["dim"]
    per_stream = 2 * n * c * c * (1 + 1 + 2 + 2 + 1) + 2 * n * c * (b * b + g * g)  # proj, in, 2C in/out, out; tokens
    return float(2 * per_stream)


@register(
    name="maxim_cross_gating", family=Family.VISION,
    paper=Paper("MAXIM: Multi-Axis MLP for Image Processing", "2201.02973", 2022),
    patterns=("noncausal-self",), complexity="O(N C (b^2 + g^2) + N C^2)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "block_size": c["block_size"], "grid_size": c["grid_size"]},
    reference=naive_maxim_cross_gating_module, functional=multi_axis_spatial_weights,
    default_config={"dim": 96, "block_size": 8, "grid_size": 8},
    tiny_config={"dim": 8, "block_size": 2, "grid_size": 2},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (4, 6)},
    input_kind=InputKind.IMAGE,
    notes="Registry fit: the block takes two maps x, y (B, Y, X, C) and returns two; forward(x, y, return_both=True) "
          "gives (x_out, y_out), forward(x, y) gives x_out (which already aggregates y_out, see below), and "
          "forward(x) takes y = x (the single-input form the registry's generic tests and benchmarks run; every "
          "parameter is still on the path). No *-cross pattern: the registry's cross context is a (B, M, C) "
          "sequence of another length, while the two streams here must share one map. Follows the released "
          "google-research/maxim CrossGatingBlock: x0 = Conv1x1(x), y0 = Conv1x1(y) (Linear here; y_dim sets y's "
          "channels), x1 = GELU(Dense(LN(x0))), y1 likewise, G(.) = GetSpatialGatingWeights (LN -> Dense(C, 2C) -> "
          "GELU -> first half dense over each g x g grid group, second half over each b x b block, weights N(0, "
          "0.02), bias 1 -> concat -> Dense(2C, C); op multi_axis_spatial_weights), y_out = y0 + Dense(y1 * G(x1)), "
          "x_out = x0 + Dense(x1 * G(y1)) + y_out. The '+ y_out' in x_out is the released code's aggregation "
          "(aggregate=False drops it, the paper-figure form X' = X + W(X1 * G(Y1))) [the paper's equation not "
          "checked against its PDF here]. The block's optional ConvTranspose upsampling of y (upsample_y) and "
          "dropout are left to the caller. Y, X must be multiples of b and g (ValueError naming the option); "
          "MAXIM pads and crops around its layers. Not compared numerically with the JAX release (flax is not "
          "installed here); structure read from its source.",
)
class MaximCrossGating(nn.Module):
    """MAXIM cross-gating block on ``x (B, Y, X, C)`` and ``y (B, Y, X, C_y)``.

    Args:
        dim: ``C`` (the block's width; x's channels). y_dim: y's channels (default ``C``).
        block_size: ``b``; grid_size: ``g``: both must divide ``Y`` and ``X``.
        aggregate: add ``y_out`` to ``x_out`` as the released code does.

    ``forward(x, y=None, *, return_both=False)``: ``x_out (B, Y, X, C)``, or ``(x_out, y_out)`` with
    ``return_both``; ``y=None`` gates ``x`` with itself.

    Example:
        >>> m = MaximCrossGating(64, block_size=8, grid_size=8)
        >>> skip, glob = m(skip, upsampled_global, return_both=True)
    """

    def __init__(self, dim: int, block_size: int = 8, grid_size: int = 8, *, y_dim: int | None = None,
                 aggregate: bool = True):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.y_dim = dim if y_dim is None else int_option(self, "y_dim", y_dim, 1)
        self.block_size = int_option(self, "block_size", block_size, 1)
        self.grid_size = int_option(self, "grid_size", grid_size, 1)
        if not isinstance(aggregate, bool):
            raise TypeError(f"{type(self).__name__}: aggregate must be a bool, got {type(aggregate).__name__}")
        self.aggregate = aggregate
        self.proj_x, self.proj_y = nn.Linear(dim, dim), nn.Linear(self.y_dim, dim)
        self.norm_x, self.norm_y = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.in_x, self.in_y = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gate_x = SpatialGatingWeights(dim, self.block_size, self.grid_size)
        self.gate_y = SpatialGatingWeights(dim, self.block_size, self.grid_size)
        self.out_x, self.out_y = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _check(self, t: torch.Tensor, name: str, channels: int) -> None:
        channels_last_hint(type(self).__name__, t, channels)
        check_input(self, t, "(B, Y, X, C)", channels=channels, name=name)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, return_both: bool = False):
        self._check(x, "x", self.dim)
        if y is None:
            if self.y_dim != self.dim:
                raise ValueError(f"{type(self).__name__}: y is required when y_dim ({self.y_dim}) != dim ({self.dim})")
            y = x
        else:
            self._check(y, "y", self.y_dim)
            if y.shape[:3] != x.shape[:3]:
                raise ValueError(f"{type(self).__name__}: y must share x's (B, Y, X) = {tuple(x.shape[:3])}, got "
                                 f"{tuple(y.shape[:3])} (upsample y first)")
        Y, X = x.shape[1:3]
        for name, s in (("block_size", self.block_size), ("grid_size", self.grid_size)):
            if Y % s or X % s:
                raise ValueError(f"{type(self).__name__}: the map (Y, X) = {(Y, X)} must be a multiple of {name} ({s}) "
                                 "on both sides (MAXIM pads and crops around the layer)")
        x0, y0 = self.proj_x(x), self.proj_y(y)                                        # shortcuts, (B, Y, X, C)
        x1 = F.gelu(self.in_x(self.norm_x(x0)))
        y1 = F.gelu(self.in_y(self.norm_y(y0)))
        gx, gy = self.gate_x(x1), self.gate_y(y1)                                       # each (B, Y, X, C)
        y_out = y0 + self.out_y(y1 * gx)                                                 # y gated by x
        x_out = x0 + self.out_x(x1 * gy)                                                 # x gated by y
        if self.aggregate:
            x_out = x_out + y_out
        return (x_out, y_out) if return_both else x_out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, y_dim={self.y_dim}, block_size={self.block_size}, grid_size={self.grid_size}, "
                f"aggregate={self.aggregate}")


