"""MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (arXiv 2406.14909).

Every head has its own causal sliding window whose span grows with the input length,
``S_h(N) = clamp(alpha_h + beta_h N, 1, N)``, plus ``g`` always-visible initial (sink)
tokens. Heads with equal spans share one mask ``causal & (sliding_window(S - 1, 0) |
global_tokens(g))``, so each distinct span is one ``ak.attention`` call (the blocked backend walks
its diagonal band and sink tiles, K/V read through views); the outputs are put back in head order.
The (alpha, beta) plan comes from MoA's offline profiling; it is an input here.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.per_head.moa import moa_attention, moa_spans
from attnkit.reference.naive_modules import naive_moa
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    spans = moa_spans(torch.tensor(cfg["alphas"]), torch.tensor(cfg["betas"]), n)
    pairs = sum(min(n * (n + 1) // 2, int(s) * n + cfg["sink"] * n) for s in spans)
    return 8 * b * n * c * c + 4 * b * pairs * (c // h)


_DEFAULT = {"dim": 32, "num_heads": 4, "alphas": [4.0, 8.0, 0.0, -4.0],
            "betas": [0.0, 0.0, 0.25, 0.5], "sink": 4, "block_size": 8}
_TINY = {"dim": 8, "num_heads": 2, "alphas": [2.0, 0.0], "betas": [0.0, 0.25],
         "sink": 2, "block_size": 4}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "alphas": list(c["alphas"]), "betas": list(c["betas"]),
            "sink": c["sink"], "block_size": c["block_size"]}


@register(
    name="moa", family=Family.HEAD,
    paper=Paper("MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
                "2406.14909", 2024),
    patterns=("causal-self",), complexity="O(N (alpha_h + beta_h N) D) per head", flops=_flops,
    options=_options, reference=naive_moa, functional=moa_attention, default_config=_DEFAULT, tiny_config=_TINY,
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 12},
    notes="N in the span rule is the length of the call (prompt length); spans round to the nearest token "
          "and clamp to [1, N]; sink = 64 tokens by default (the reference's one global block of 64). "
          "The profiling/search that chooses (alpha, beta) is not implemented: the plan is an input.",
)
class MoA(nn.Module):
    """MoA causal self-attention with a fixed per-head span plan.

    Args:
        dim: ``C``; num_heads: ``H``; alphas, betas: per-head span rule (length ``H``);
        sink: initial tokens always visible; block_size: engine tile.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> m = MoA(64, 4, alphas=[256, 512, 0, 128], betas=[0, 0, 0.25, 0.1])
        >>> y = m(torch.randn(1, 2048, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, alphas, betas, sink: int = 64, block_size: int = 64,
                 bias: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.sink, self.block_size = int_option(self, "sink", sink, 0), int_option(self, "block_size", block_size, 1)
        self.register_buffer("alphas", torch.as_tensor(alphas, dtype=torch.float64).reshape(-1), persistent=True)
        self.register_buffer("betas", torch.as_tensor(betas, dtype=torch.float64).reshape(-1), persistent=True)
        if self.alphas.numel() != num_heads or self.betas.numel() != num_heads:
            raise ValueError(f"{type(self).__name__}: alphas and betas need one entry per head ({num_heads}), "
                             f"got {self.alphas.numel()} and {self.betas.numel()}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="per-head spans are computed from the alphas "
                    "and betas buffers' values")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        o = moa_attention(q, k, v, self.alphas, self.betas, sink=self.sink, block_size=self.block_size)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, sink={self.sink}, block={self.block_size}"

