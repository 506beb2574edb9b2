"""Neighborhood attention modules: NA 1-D/2-D/3-D (NAT, FNA, GNA) and DiNAT-style dilated stacks.

"Neighborhood Attention Transformer" (arXiv 2204.07143), "Dilated Neighborhood Attention
Transformer" (arXiv 2209.15001), "Faster Neighborhood Attention" (arXiv 2403.04690),
"Generalized Neighborhood Attention" (arXiv 2504.16922).

Module = ``Linear(C, 3C)`` -> heads-last q, k, v -> ``ak.neighborhood_attention`` ->
``Linear(C, C)`` (NATTEN's module structure). Inputs are channels-last
``(B, N, C)``, ``(B, X, Y, C)`` or ``(B, T, X, Y, C)``. No relative positional bias (NATTEN >=
0.20 dropped it; our choice, noted in the registry).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit._validate import int_arg, per_dim
from attnkit.masks.neighborhood import neighborhood_mask
from attnkit.ops.neighborhood.call import neighborhood_attention
from attnkit.reference.naive_modules import naive_dilated_neighborhood, naive_neighborhood
from attnkit.registry import Family, InputKind, Paper, check_input, divisible, named_errors, register

NAT = Paper("Neighborhood Attention Transformer", "2204.07143", 2022)
DINAT = Paper("Dilated Neighborhood Attention Transformer", "2209.15001", 2022)


class _NeighborhoodAttention(nn.Module):
    """Shared body of NeighborhoodAttention1D/2D/3D; ``rank`` is the number of spatial dims."""

    rank = 0

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, stride=1, is_causal=False,
                 qkv_bias: bool = True, backend: str | None = None):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, divisible(self, dim, num_heads)
        with named_errors(self):
            for name, value in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride)):
                for v in per_dim(name, value, self.rank):
                    int_arg(name, v, 1)
            per_dim("is_causal", is_causal, self.rank, kind=bool)
        self.kernel_size, self.dilation, self.stride, self.is_causal = kernel_size, dilation, stride, is_causal
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, dilation=None) -> torch.Tensor:
        """``x (B, *S, C)`` channels-last -> ``(B, *S, C)``; ``dilation`` overrides the configured one."""
        check_input(self, x, _LAYOUTS[self.rank], channels=self.dim,
                    meta="the neighborhood_attention op has no meta path")
        spatial = x.shape[1:-1]
        qkv = self.qkv(x).view(x.shape[0], *spatial, 3, self.num_heads, self.head_dim)  # (B, *S, 3, H, D)
        q, k, v = qkv.unbind(-3)  # each (B, *S, H, D)
        dil = self.dilation if dilation is None else dilation
        out = neighborhood_attention(q, k, v, self.kernel_size, dilation=dil, stride=self.stride,
                                     is_causal=self.is_causal, backend=self.backend)
        return self.proj(out.reshape(x.shape))  # (B, *S, C)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}")


_LAYOUTS = {1: "(B, N, C)", 2: "(B, Y, X, C)", 3: "(B, T, Y, X, C)"}


def _na_flops(cfg: dict) -> float:
    """Projections plus attention over the exact number of allowed pairs."""
    shape, C = tuple(cfg["input_size"]), cfg["dim"]
    n = math.prod(shape)
    pairs = neighborhood_mask(shape, cfg["kernel_size"], cfg.get("dilation", 1), cfg.get("stride", 1),
                              cfg.get("causal", False)).count()
    return float(cfg.get("batch", 1) * (2 * n * C * 4 * C + 4 * pairs * C))


def _na_options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "kernel_size": c["kernel_size"],
            "dilation": c.get("dilation", 1), "stride": c.get("stride", 1), "is_causal": c.get("causal", False)}


def _grid_shape(c: dict) -> tuple[int, ...]:
    return (c.get("batch", 1), *c["input_size"], c["dim"])  # channels-last (B, *S, C), 1-D included


_NA_NOTES = ("No relative positional bias (NATTEN >= 0.20 semantics). Windows shift at borders "
             "(non-causal) and are clipped (causal, per axis). Runs on ak.neighborhood_attention (tiled CPU backend).")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention on ``(B, N, C)`` (NATTEN ``NeighborhoodAttention1D``)."""

    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention on channels-last images ``(B, X, Y, C)``."""

    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention on channels-last videos ``(B, T, X, Y, C)``."""

    rank = 3


_D1 = {"dim": 32, "num_heads": 4, "kernel_size": 5}, {"batch": 2, "input_size": (24,)}
_D2 = {"dim": 32, "num_heads": 4, "kernel_size": 3}, {"batch": 2, "input_size": (8, 7)}
_D3 = {"dim": 16, "num_heads": 2, "kernel_size": 3}, {"batch": 1, "input_size": (4, 5, 5)}
_T1 = {"dim": 8, "num_heads": 2, "kernel_size": 3}, {"batch": 1, "input_size": (7,)}
_T2 = {"dim": 8, "num_heads": 2, "kernel_size": 3}, {"batch": 1, "input_size": (4, 5)}
_T3 = {"dim": 8, "num_heads": 2, "kernel_size": 3}, {"batch": 1, "input_size": (3, 3, 4)}
for _cls, _name, (_default, _input), (_tiny, _tiny_input), _kind in (
        (NeighborhoodAttention1D, "neighborhood_1d", _D1, _T1, InputKind.SEQUENCE),
        (NeighborhoodAttention2D, "neighborhood_2d", _D2, _T2, InputKind.IMAGE),
        (NeighborhoodAttention3D, "neighborhood_3d", _D3, _T3, InputKind.VIDEO)):
    register(name=_name, family=Family.LOCAL, paper=NAT, patterns=("noncausal-self", "causal-self"),
             complexity="O(N prod(k) D)", flops=_na_flops, options=_na_options, reference=naive_neighborhood,
             functional=neighborhood_attention, default_config=_default, tiny_config=_tiny, notes=_NA_NOTES,
             default_input=_input, tiny_input=_tiny_input,
             input_kind=_kind, shape=_grid_shape)(_cls)


class DilatedNeighborhoodAttention(nn.Module):
    """DiNAT-style stack: pre-norm residual NA layers whose dilations follow a schedule.

    ``dilations=(1, "auto")`` alternates NA (dilation 1) and DiNA with ``floor(extent / kernel)``
    per axis (DiNAT's rule, arXiv 2209.15001), computed from the input size. Each layer is a
    :class:`NeighborhoodAttention2D` (or 1D/3D by ``rank``): ``x = x + NA_l(LN(x))``.

    Example:
        >>> m = DilatedNeighborhoodAttention(64, 4, 7, dilations=(1, "auto"))
        >>> m(torch.randn(1, 56, 56, 64)).shape
    """

    def __init__(self, dim: int, num_heads: int, kernel_size, dilations=(1, "auto"), rank: int = 2,
                 is_causal=False, qkv_bias: bool = True, backend: str | None = None):
        super().__init__()
        who = type(self).__name__
        cls = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}.get(rank)
        if cls is None:
            raise ValueError(f"{who}: rank must be 1, 2 or 3, got {rank!r}")
        divisible(self, dim, num_heads)
        with named_errors(self):
            for v in per_dim("kernel_size", kernel_size, rank):
                int_arg("kernel_size", v, 1)
        if not isinstance(dilations, (tuple, list)) or not dilations:
            raise ValueError(f"{who}: dilations must be a non-empty tuple, got {dilations!r}")
        for d in dilations:
            if d != "auto":
                with named_errors(self):
                    for v in per_dim("dilations entry", d, rank):
                        int_arg("dilations entry", v, 1)
        self.dim, self.rank = dim, rank
        self.dilations, self.kernel_size = tuple(dilations), kernel_size
        self.layers = nn.ModuleList(cls(dim, num_heads, kernel_size, 1, 1, is_causal, qkv_bias, backend)
                                    for _ in dilations)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in dilations)

    def resolve(self, spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The per-layer dilation tuples for an input of spatial extent ``spatial``."""
        ks = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,) * len(spatial)
        auto = tuple(max(1, n // k) for n, k in zip(spatial, ks))
        return [auto if d == "auto" else (d if isinstance(d, tuple) else (d,) * len(spatial)) for d in self.dilations]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, *S, C)`` channels-last -> ``(B, *S, C)``."""
        check_input(self, x, _LAYOUTS[self.rank], channels=self.dim,
                    meta="the neighborhood_attention op has no meta path")
        for layer, norm, d in zip(self.layers, self.norms, self.resolve(tuple(x.shape[1:-1]))):
            x = x + layer(norm(x), dilation=d)
        return x


def _dinat_options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "kernel_size": c["kernel_size"],
            "dilations": tuple(c["dilations"]), "rank": len(c["input_size"]), "is_causal": c.get("causal", False)}


def _dinat_flops(cfg: dict) -> float:
    m = DilatedNeighborhoodAttention(**_dinat_options(cfg))
    return sum(_na_flops({**cfg, "dilation": d}) for d in m.resolve(tuple(cfg["input_size"])))


_DD = {"dim": 32, "num_heads": 4, "kernel_size": 3, "dilations": (1, "auto")}
_DD_TINY = {"dim": 8, "num_heads": 2}


register(name="dilated_neighborhood", family=Family.LOCAL, paper=DINAT, patterns=("noncausal-self", "causal-self"),
         complexity="O(N prod(k) D) per layer", flops=_dinat_flops, options=_dinat_options,
         reference=naive_dilated_neighborhood, functional=neighborhood_attention, default_config=_DD,
         tiny_config=_DD_TINY, default_input={"batch": 2, "input_size": (9, 8)},
         tiny_input={"batch": 1, "input_size": (6, 6)},  # "auto" = dilation 2
         notes="A stack of pre-norm residual NA layers; dilations (1, 'auto') alternate NA and DiNA with "
               "floor(extent / kernel) (DiNAT rule). MLPs and downsamplers of the DiNAT backbone are left out.",
         input_kind=InputKind.IMAGE)(DilatedNeighborhoodAttention)
