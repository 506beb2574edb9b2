"""S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (arXiv 2407.17678).

The module: parameters and projections around the op in ``attnkit.ops.per_head.s2``, whose docstring
describes the algorithm.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.per_head.s2 import s2_attention, s2_layout
from attnkit.reference.naive_modules import naive_s2
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _density(cfg: dict) -> float:
    n = math.ceil(cfg["seq_len"] / cfg["block_size"])
    lay = s2_layout(cfg["num_heads"], n, cfg["local_blocks"], cfg["vert_stride"], causal=cfg["causal"])
    return lay.float().mean().item()


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    return 8 * b * n * c * c + 4 * b * n * n * c * _density(cfg)


_DEFAULT = {"dim": 32, "num_heads": 4, "block_size": 4, "local_blocks": 2, "vert_stride": 4, "causal": True}
_TINY = {"dim": 8, "num_heads": 2, "block_size": 2, "local_blocks": 2, "vert_stride": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "block_size": c["block_size"],
            "local_blocks": c["local_blocks"], "vert_stride": c["vert_stride"], "causal": c["causal"]}


@register(
    name="s2_attention", family=Family.HEAD,
    paper=Paper("S2-Attention: Hardware-Aware Context Sharding Among Attention Heads", "2407.17678", 2024),
    patterns=("causal-self", "noncausal-self"), complexity="O(N (l b + N / v) D)", flops=_flops,
    options=_options, reference=naive_s2, functional=s2_attention, default_config=_DEFAULT, tiny_config=_TINY,
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 16},
    notes="dkernel's layout rule (its get_sparse_attn_mask, checked against the released code): absolute stripes "
          "of KV head h offset by h*max(1, v // Hq) with Hq the QUERY heads (causal); the bidirectional rule "
          "(relative stripes) is the same for every head. GQA (the op): the pattern is indexed by KV head and "
          "shared by its query group; the op's gqa_rule='kv' keeps attnkit's earlier step max(1, v // Hkv), "
          "which spreads the KV heads' stripes over the whole stride (the two agree without GQA and when "
          "v <= Hkv; this module has no GQA, so Hq = H). The layer-level hybrid (dense every n-th layer) is a "
          "model choice outside this module.",
)
class S2Attention(nn.Module):
    """S2-Attention self-attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; block_size: ``b`` (64); local_blocks: ``l`` (16);
        vert_stride: ``v`` (8); causal (default False, as every module of the library);
        num_dense_heads: dense heads at the end.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = S2Attention(256, 8, block_size=64, local_blocks=4, vert_stride=8)(torch.randn(1, 2048, 256))
    """

    def __init__(self, dim: int, num_heads: int, *, block_size: int = 64, local_blocks: int = 16,
                 vert_stride: int = 8, causal: bool = False, num_dense_heads: int = 0, bias: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        for name, value in (("block_size", block_size), ("local_blocks", local_blocks), ("vert_stride", vert_stride)):
            int_option(self, name, value, 1)
        if not 0 <= int_option(self, "num_dense_heads", num_dense_heads, 0) <= num_heads:
            raise ValueError(f"{type(self).__name__}: num_dense_heads must be in [0, {num_heads}], "
                             f"got {num_dense_heads}")
        self.dim = dim
        self.num_heads, self.block_size = num_heads, block_size
        self.local_blocks, self.vert_stride = local_blocks, vert_stride
        self.causal, self.num_dense_heads = causal, num_dense_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="the op reads its block layout as numbers")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        o = s2_attention(q, k, v, self.block_size, self.local_blocks, self.vert_stride, causal=self.causal,
                         num_dense_heads=self.num_dense_heads)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, block={self.block_size}, local={self.local_blocks}, " \
               f"vert_stride={self.vert_stride}, causal={self.causal}"

