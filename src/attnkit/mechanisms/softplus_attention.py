"""Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models
(arXiv 2501.13428) — LSSA (length-scaled softplus attention) and LSSAR (with re-weighting).

The module: parameters and projections around the op in ``attnkit.ops.dense.softplus``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.dense.softplus import softplus_attention
from attnkit.reference.naive_modules import naive_softplus_attention
from attnkit.registry import Family, Paper, check_input, divisible, float_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    return 8 * b * n * c * c + 4 * b * n * n * c


_DEFAULT = {"dim": 64, "num_heads": 4, "p": 15.0, "causal": True}
_TINY = {"dim": 8, "num_heads": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "p": c["p"], "causal": c["causal"]}


@register(
    name="softplus_attention", family=Family.DENSE,
    paper=Paper("Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
                "2501.13428", 2025),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 d)", flops=_flops,
    options=_options, reference=naive_softplus_attention, functional=softplus_attention,
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 2, "seq_len": 32},
    tiny_input={"batch": 1, "seq_len": 6},
    notes="p=None gives LSSA, p>0 LSSAR. O_t = offset (1) for rows with more than 3 visible keys, else 0 "
          "(a public re-implementation's choice). N_t = visible keys of row t. Materialised per query "
          "chunk (LSSAR needs the whole LSSA row before sharpening). Weights are divided by the row max "
          "before ^p (scale-free) so fp32/half never overflow.",
)
class SoftplusAttention(nn.Module):
    """LSSA / LSSAR self-attention.

    Args:
        dim: ``C``; num_heads: ``H``; p: re-weighting power (> 0) or None (LSSA); causal: causal mask
        (default False, as every module of the library); offset: ``O_t`` (>= 0).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = SoftplusAttention(64, 4, p=15.0)(torch.randn(2, 128, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, p: float | None = 15.0, causal: bool = False,
                 offset: float = 1.0, bias: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        p = float_option(self, "p", p, minimum=0.0, exclusive=True, optional=True)
        offset = float_option(self, "offset", offset, minimum=0.0)
        self.dim, self.num_heads, self.p, self.causal, self.offset = dim, num_heads, p, bool(causal), offset
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        o = softplus_attention(q, k, v, causal=self.causal, p=self.p, offset=self.offset)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, p={self.p}, causal={self.causal}"

