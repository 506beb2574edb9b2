"""MaxViT multi-axis attention: block (window) attention followed by grid (dilated global) attention.

"MaxViT: Multi-Axis Vision Transformer", arXiv 2204.01697 (ECCV 2022).

The module: parameters and projections around the op in ``attnkit.ops.local.multi_axis``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.local.multi_axis import block_attention, grid_attention, relative_bias
from attnkit.reference.naive_modules import naive_maxvit
from attnkit.registry import Family, InputKind, Paper, check_input, divisible, int_option, register


class _RelAttention(nn.Module):
    """``Linear(C, 3C)`` -> block or grid attention with a relative bias table -> ``Linear(C, C)``."""

    def __init__(self, dim: int, num_heads: int, size: int, kind: str):
        super().__init__()
        self.num_heads, self.size, self.kind = num_heads, size, kind
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * size - 1) ** 2, num_heads) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, Y, X, C = x.shape
        q, k, v = self.qkv(x).view(B, Y, X, 3, self.num_heads, C // self.num_heads).unbind(3)  # (B, Y, X, H, D)
        fn = block_attention if self.kind == "block" else grid_attention
        out = fn(q, k, v, self.size, bias=relative_bias(self.table, self.size))
        return self.proj(out.reshape(B, Y, X, C))


class MultiAxisAttention(nn.Module):
    """MaxViT multi-axis attention on channels-last ``(B, Y, X, C)``: a pure token mixer, block then grid.

    ``y = GridAttn(BlockAttn(x))``, each with its own qkv / output projections and relative bias table.
    Like every other mixer of the library it has no norm and no residual: MaxViT's block wraps each
    attention as ``x + Attn(LN(x))`` (with MBConv and FFNs), which belongs to the model around it.
    ``Y`` and ``X`` must be multiples of ``block_size`` and ``grid_size`` (MaxViT's released code and
    timm assert the same).
    """

    def __init__(self, dim: int, num_heads: int, block_size: int = 7, grid_size: int = 7):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim = dim
        self.block_size = int_option(self, "block_size", block_size, 1)
        self.grid_size = int_option(self, "grid_size", grid_size, 1)
        self.block = _RelAttention(dim, num_heads, block_size, "block")
        self.grid = _RelAttention(dim, num_heads, grid_size, "grid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, Y, X, C)`` -> ``(B, Y, X, C)``."""
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        Y, X = x.shape[1:3]
        for name, size in (("block_size", self.block_size), ("grid_size", self.grid_size)):
            if Y % size or X % size:
                raise ValueError(f"{type(self).__name__}: the map (Y, X) = {(Y, X)} must be a multiple of {name} "
                                 f"({size}) on both sides; pad or crop the input")
        return self.grid(self.block(x))


def _flops(cfg: dict) -> float:
    B, C = cfg.get("batch", 1), cfg["dim"]
    n = cfg["input_size"][0] * cfg["input_size"][1]
    return float(B * 2 * (2 * n * C * 4 * C) + B * 4 * n * (cfg["block_size"] ** 2 + cfg["grid_size"] ** 2) * C)


_DEFAULT = {"dim": 32, "num_heads": 4, "block_size": 4, "grid_size": 2}
_TINY = {"dim": 8, "num_heads": 2, "block_size": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "block_size": c["block_size"], "grid_size": c["grid_size"]}


register(name="maxvit_attention", family=Family.LOCAL,
         paper=Paper("MaxViT: Multi-Axis Vision Transformer", "2204.01697", 2022),
         patterns=("noncausal-self",), complexity="O(N (P^2 + G^2) D)", flops=_flops, options=_options,
         reference=naive_maxvit, functional=(block_attention, grid_attention), default_config=_DEFAULT,
         tiny_config=_TINY, default_input={"batch": 2, "input_size": (8, 8)},
         tiny_input={"batch": 1, "input_size": (4, 4)},
         notes="A pure token mixer: grid(block(x)), each attention with its own qkv/proj and ((2M-1)^2, H) "
               "relative bias (trunc-normal-ish init 0.02). MaxViT's pre-norm residual around each attention, "
               "MBConv and FFNs belong to the block around it (no LayerNorm, no residual here). Block and grid "
               "sizes must divide the map (ValueError, as the released code and timm assert).",
         input_kind=InputKind.IMAGE)(MultiAxisAttention)

