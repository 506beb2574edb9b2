"""MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv 2502.13189).

Keys are cut into blocks; a parameter-free router scores every block by its mean key and
each query attends, at token level, only inside its top-k blocks. Causal: the query's own
block is always selected (causally masked inside) and blocks past the query are never
candidates; the top-k budget counts the own block. The module is projections around
:func:`~attnkit.ops.routed.moba.moba_attention`, which picks the path (``ak.explain`` shows it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.routed.moba import moba_attention
from attnkit.reference.naive_modules import naive_moba_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h, bs, k = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"], cfg["block_size"], cfg["topk"]
    d = c // h
    return 8 * b * n * c * c + 2 * b * h * n * math.ceil(n / bs) * d + 4 * b * h * n * min(n, k * bs) * d


_DEFAULT = {"dim": 32, "num_heads": 4, "block_size": 8, "topk": 3, "causal": True, "routing": "token"}
_TINY = {"dim": 8, "num_heads": 2, "block_size": 3, "topk": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "block_size": c["block_size"], "topk": c["topk"],
            "causal": c["causal"], "routing": c["routing"]}


@register(
    name="moba", family=Family.ROUTED,
    paper=Paper("MoBA: Mixture of Block Attention for Long-Context LLMs", "2502.13189", 2025),
    patterns=("causal-self", "noncausal-self"), complexity="O(N^2 D / Bk + N k Bk D)", flops=_flops,
    options=_options, reference=naive_moba_module, functional=moba_attention,
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 2, "seq_len": 64},
    tiny_input={"batch": 1, "seq_len": 12},
    notes="topk counts the own block; ties go to the lower block index; gate scores in fp32 without "
          "1/sqrt(D) and without gradient. routing='token' is the paper (per-query routes, run as the paper's "
          "dispatch: own block as one batched causal block-diagonal call, every other selected block attended "
          "in full by the queries that chose it, partials merged by log-sum-exp); routing='block' routes each "
          "query block by its mean query (exactly topk blocks per row). VMoBA is the separate `vmoba` entry.",
)
class MoBA(nn.Module):
    """MoBA self-attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; block_size: ``Bk``; topk: blocks per query incl. its own;
        causal: causal LM attention (default False, as every module of the library; MoBA's LLM setting
        is ``causal=True``); routing: ``"token"`` (paper) or ``"block"``.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``; ``topk <= ceil(N / block_size)`` is required.

    Example:
        >>> y = MoBA(256, 4, block_size=512, topk=3)(torch.randn(1, 4096, 256))
    """

    def __init__(self, dim: int, num_heads: int, *, block_size: int = 512, topk: int = 3, causal: bool = False,
                 routing: str = "token", bias: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads, self.causal = dim, num_heads, bool(causal)
        self.block_size, self.topk = int_option(self, "block_size", block_size, 1), int_option(self, "topk", topk, 1)
        self.routing = choice_option(self, "routing", routing, ("token", "block"))
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="block routing depends on the values")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        o = moba_attention(q, k, v, self.block_size, self.topk, causal=self.causal, routing=self.routing)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, block={self.block_size}, topk={self.topk}, causal={self.causal}, " \
               f"routing={self.routing}"

