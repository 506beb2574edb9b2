"""HaloNet: blocked local self-attention with haloes.

"Scaling Local Self-Attention for Parameter Efficient Visual Backbones", arXiv 2103.12731
(CVPR 2021).

The module: parameters and projections around the op in ``attnkit.ops.local.halo``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.local.halo import halo_attention
from attnkit.reference.naive_modules import naive_halo
from attnkit.registry import Family, InputKind, Paper, check_input, divisible, int_option, register


class HaloAttention(nn.Module):
    """HaloNet attention layer on channels-last images ``(B, Y, X, C)``.

    ``q = x W_q``, ``(k, v) = x W_kv`` (no bias, as timm), :func:`halo_attention` with learned
    row/column relative embeddings shared by all heads, then an output projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, block_size: int = 8, halo_size: int = 3,
                 qkv_bias: bool = False, mask_padding: bool = True):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, divisible(self, dim, num_heads)
        int_option(self, "block_size", block_size, 1)
        int_option(self, "halo_size", halo_size, 0)
        self.block_size, self.halo_size, self.mask_padding = block_size, halo_size, mask_padding
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        n_rel = 2 * (block_size + halo_size) - 1
        self.rel_h = nn.Parameter(torch.randn(n_rel, self.head_dim) * self.head_dim ** -0.5)
        self.rel_w = nn.Parameter(torch.randn(n_rel, self.head_dim) * self.head_dim ** -0.5)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, Y, X, C)`` -> ``(B, Y, X, C)``; ``Y`` and ``X`` must be multiples of ``block_size``."""
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        B, Y, X, C = x.shape
        if Y % self.block_size or X % self.block_size:
            # HaloNet's reference code (timm's HaloAttn) asserts this too; no padding rule is published
            raise ValueError(f"{type(self).__name__}: the map (Y, X) = {(Y, X)} must be a multiple of block_size "
                             f"({self.block_size}) on both sides; pad or crop the input")
        q = self.q(x).view(B, Y, X, self.num_heads, self.head_dim)  # (B, Y, X, H, D)
        k, v = self.kv(x).view(B, Y, X, 2, self.num_heads, self.head_dim).unbind(3)  # each (B, Y, X, H, D)
        out = halo_attention(q, k, v, self.block_size, self.halo_size, rel_h=self.rel_h, rel_w=self.rel_w,
                             mask_padding=self.mask_padding)
        return self.proj(out.reshape(B, Y, X, C))


def _flops(cfg: dict) -> float:
    B, C = cfg.get("batch", 1), cfg["dim"]
    Y, X = cfg["input_size"]
    W = cfg["block_size"] + 2 * cfg["halo_size"]
    n = Y * X
    return float(B * (2 * n * C * 4 * C + 4 * n * W * W * C + 4 * n * (2 * (W - 1)) * C // cfg["num_heads"]))


_DEFAULT = {"dim": 32, "num_heads": 4, "block_size": 4, "halo_size": 1}
_TINY = {"dim": 8, "num_heads": 2, "block_size": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "block_size": c["block_size"],
            "halo_size": c["halo_size"]}


register(name="halonet", family=Family.LOCAL,
         paper=Paper("Scaling Local Self-Attention for Parameter Efficient Visual Backbones", "2103.12731", 2021),
         patterns=("noncausal-self",), complexity="O(N (b+2h)^2 D)", flops=_flops, options=_options,
         reference=naive_halo, functional=halo_attention, default_config=_DEFAULT, tiny_config=_TINY,
         default_input={"batch": 2, "input_size": (8, 8)}, tiny_input={"batch": 1, "input_size": (4, 4)},
         notes="Padded window positions are masked by default (mask_padding=False keeps timm's zero keys). "
               "Relative embeddings: two full-D tables (row, column) indexed by the true offset, shared by "
               "heads; only the content term is scaled (timm). An output projection is added (lucidrains). The map "
               "must be a multiple of block_size (ValueError otherwise, as timm's HaloAttn asserts).",
         input_kind=InputKind.IMAGE)(HaloAttention)

