"""VMoBA: Mixture-of-Block Attention for Video Diffusion Models (arXiv 2506.23858).

Non-causal MoBA on a video token grid ``(T, Y, X)`` (raster order) with three changes:
successive layers cycle the key-block partition 1-D (``s_T`` whole frames: contiguous in the
flattened sequence), 2-D (an ``s_Y x s_X`` tile over all frames) and 3-D (an ``s_T x s_Y x s_X``
cube); blocks are selected globally over all ``(query, key block)`` pairs of a head instead of
per query; and the number of pairs is set by a cumulative-similarity threshold ``tau``. Every
query always attends its own block. The module is projections around
:func:`~attnkit.ops.routed.vmoba.vmoba_attention`, which picks the path (``ak.explain`` shows it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit._validate import int_arg
from attnkit.ops.routed.vmoba import SELECTIONS, VMoBAConfig, block_shape, layer_mode, vmoba_attention
from attnkit.reference.naive_modules import naive_vmoba_module
from attnkit.registry import (
    Family,
    InputKind,
    Paper,
    check_input,
    choice_option,
    divisible,
    float_option,
    named_errors,
    register,
)


def _flops(cfg: dict) -> float:
    """Projections + gating + attention at the expected selected fraction (``threshold`` -> its paper density)."""
    b, c, h = cfg["batch"], cfg["dim"], cfg["num_heads"]
    T, Y, X = cfg["grid_shape"]
    N, d = T * Y * X, c // h
    mode = layer_mode(cfg["layer_idx"])
    bs = math.prod(block_shape((T, Y, X), mode, VMoBAConfig(cfg["block_1d"], tuple(cfg["block_2d"]),
                                                              tuple(cfg["block_3d"]))))
    n = math.ceil(N / bs)
    density = cfg.get("density", 1.0 if cfg["selection"] == "threshold" else min(1.0, cfg["topk"] / n))
    return 8 * b * N * c * c + 2 * b * h * N * n * d + 4 * b * h * N * N * density * d


_DEFAULT = {"dim": 32, "num_heads": 4, "layer_idx": 2, "block_1d": 2, "block_2d": (2, 2), "block_3d": (2, 2, 2),
            "selection": "threshold", "threshold": 0.25, "topk": None}
_TINY = {"dim": 8, "num_heads": 2, "block_3d": (1, 2, 2)}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "layer_idx": c["layer_idx"], "block_1d": c["block_1d"],
            "block_2d": tuple(c["block_2d"]), "block_3d": tuple(c["block_3d"]), "selection": c["selection"],
            "threshold": c["threshold"], "topk": c["topk"]}


@register(
    name="vmoba", family=Family.ROUTED,
    paper=Paper("VMoBA: Mixture-of-Block Attention for Video Diffusion Models", "2506.23858", 2025),
    patterns=("noncausal-self",), complexity="O(N D (N / s_b + k_avg s_b)) + O(N n log(N n)) sort",
    flops=_flops, options=_options, reference=naive_vmoba_module, functional=vmoba_attention,
    default_config=_DEFAULT, tiny_config=_TINY, input_kind=InputKind.VIDEO,
    default_input={"batch": 1, "grid_shape": (4, 4, 4)}, tiny_input={"grid_shape": (2, 2, 4)},
    shape=lambda c: (c["batch"], *c["grid_shape"], c["dim"]),
    notes="layer l uses partition ('1d', '2d', '3d')[l % 3] (1-D = block_1d whole frames, contiguous in "
          "raster order; 2-D = block_2d tile x all frames; 3-D = block_3d cube); 1-D blocks may be ragged in "
          "time (last block partial, mean over its real tokens), 2-D/3-D blocks must divide the grid "
          "(ValueError, as the reference asserts). Threshold pool: min-max normalised per (batch, head), a "
          "constant pool gets unit mass; own-block pairs are forced and their mass counts toward tau; the "
          "other pairs are kept in descending order while the mass before them is < tau * total (tau = 1 "
          "keeps every pair, including zero-mass ones). Global topk keeps round(topk * N) pairs with the N own "
          "pairs counted; ties go to the lower raster token, then lower block. Gate scores in fp32 (fp64 for "
          "fp64), no 1/sqrt(D), no gradient. The full-attention warm-up steps of the paper are the caller's.",
)
class VMoBAAttention(nn.Module):
    """VMoBA self-attention layer on channels-last video tokens.

    Args:
        dim: ``C``; num_heads: ``H``; layer_idx: picks the partition (``l % 3`` -> 1-D, 2-D, 3-D);
        block_1d / block_2d / block_3d: block extents per mode; selection / threshold / topk: routing
        (see :func:`vmoba_attention`); grid_shape: ``(T, Y, X)`` for ``(B, N, C)`` inputs.

    Shapes:
        ``x (B, T, Y, X, C)`` -> same; or ``x (B, N, C)`` with ``grid_shape`` -> ``(B, N, C)``.

    Example:
        >>> m = VMoBAAttention(64, 4, layer_idx=1, block_2d=(4, 4))
        >>> y = m(torch.randn(1, 4, 16, 16, 64))  # (1, 4, 16, 16, 64)
    """

    def __init__(self, dim: int, num_heads: int, *, layer_idx: int = 0, block_1d: int = 2,
                 block_2d: tuple[int, int] = (8, 8), block_3d: tuple[int, int, int] = (2, 8, 8),
                 selection: str = "threshold", threshold: float = 0.25, topk: float | None = None,
                 grid_shape: tuple[int, int, int] | None = None, bias: bool = False):
        super().__init__()
        who = type(self).__name__
        divisible(self, dim, num_heads)
        choice_option(self, "selection", selection, SELECTIONS)
        if selection == "threshold" and not 0 < float_option(self, "threshold", threshold) <= 1:
            raise ValueError(f"{who}: threshold must be in (0, 1], got {threshold!r}")
        if selection != "threshold" and float_option(self, "topk", topk) < 1:
            raise ValueError(f"{who}: topk must be >= 1 for selection={selection!r}, got {topk!r}")
        with named_errors(self):
            self.mode = layer_mode(layer_idx)
            int_arg("block_1d", block_1d, 1)
            for name, value, n in (("block_2d", block_2d, 2), ("block_3d", block_3d, 3)):
                if not isinstance(value, (tuple, list)) or len(value) != n:
                    raise ValueError(f"{name} must be {n} positive ints, got {value!r}")
                for v in value:
                    int_arg(name, v, 1)
        self.dim = dim
        self.layer_idx, self.num_heads, self.selection, self.threshold, self.topk = (
            layer_idx, num_heads, selection, threshold, topk)
        self.config = VMoBAConfig(block_1d, tuple(block_2d), tuple(block_3d))
        if grid_shape is not None and (not isinstance(grid_shape, (tuple, list)) or len(grid_shape) != 3):
            raise ValueError(f"{who}: grid_shape must be (T, Y, X), got {grid_shape!r}")
        with named_errors(self):
            self.grid_shape = None if grid_shape is None else tuple(int_arg("grid_shape", g, 1) for g in grid_shape)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, grid_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        who, meta = type(self).__name__, "block selection depends on the values"
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            check_input(self, x, "(B, N, C)", channels=self.dim, meta=meta)
            grid = grid_shape or self.grid_shape
            if grid is None:
                raise ValueError(f"{who}: grid_shape is required for (B, N, C) inputs")
        else:
            check_input(self, x, "(B, T, Y, X, C)", channels=self.dim, meta=meta)
            grid = tuple(x.shape[1:4])
        b, c = x.shape[0], x.shape[-1]
        xs = x.reshape(b, -1, c)  # (B, N, C) raster order
        n = xs.shape[1]
        q, k, v = self.qkv(xs).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        o = vmoba_attention(q, k, v, grid, mode=self.mode, config=self.config, selection=self.selection,
                            threshold=self.threshold, topk=self.topk)
        return self.proj(o.reshape(b, n, c)).view(x.shape)  # (B, N, C) -> input shape

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, layer={self.layer_idx} ({self.mode}), {self.config}, " \
               f"selection={self.selection}, threshold={self.threshold}, topk={self.topk}"

