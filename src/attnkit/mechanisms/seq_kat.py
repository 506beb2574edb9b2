"""KArAt: Kolmogorov-Arnold Attention (arXiv 2503.10632) — attention with a learnable Fourier row operator.

Multi-head attention whose softmax is replaced by KArAt's modular KAN operator (Fourier units ``r``, grid ``G``,
projector back to the key positions); the module holds the projections and the coefficients and calls
:func:`~attnkit.ops.sequence.kat.kat_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.sequence.kat import kat_attention
from attnkit.reference.naive_sequence3 import naive_kat_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    r, g = cfg["rank"], cfg["grid"]
    pairs = n * (n + 1) / 2 if cfg["causal"] else n * n
    # projections, scores, sigma V, basis contraction (2 G terms per pair and unit), projector
    return float(b * (8 * n * c * c + 4 * pairs * c + h * (4 * g * r * pairs + 2 * r * pairs)))


_DEFAULT = {"dim": 192, "num_heads": 3, "max_len": 256, "rank": 12, "grid": 3, "causal": False}


@register(
    name="kat_attention", family=Family.DENSE,
    paper=Paper("KArAt: Kolmogorov-Arnold Attention (Is Learnable Attention Better For Vision Transformers?)",
                "2503.10632", 2025),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 (C + H r G))", flops=_flops,
    options=lambda c: {k: c[k] for k in _DEFAULT}, reference=naive_kat_module, functional=kat_attention,
    default_config=_DEFAULT, tiny_config={"dim": 8, "num_heads": 2, "max_len": 16, "rank": 3, "grid": 2},
    default_input={"batch": 8, "seq_len": 197}, tiny_input={"batch": 2, "seq_len": 6},
    notes="Modular KArAt (section 3): per head, r Fourier units over the score row (alpha, beta: (r, N, G)), "
          "projector W (N, r), no softmax and no simplex projection (the paper's default; the l1 projection is "
          "not offered). Defaults r = 12, G = 3 (the paper's best ViT-Tiny setting, G3B: one operator per layer "
          "and head; universal sharing across layers = pass one module's alpha/beta/w to several, not an option "
          "here). N is fixed by the parameters in the paper: attnkit sizes them for max_len key positions "
          "(default 256, enough for ViT's 197 tokens and the quality tasks) and an input of N <= max_len uses the "
          "leading N positions. causal=True (not in the paper) drops the terms of keys > i inside Phi and the "
          "weights on values > i, so a prefix's outputs equal the full sequence's. Initialisation (ours): "
          "alpha, beta ~ N(0, 1 / (max_len G)), W ~ N(0, 1 / (r max_len)).",
)
class KArAtAttention(nn.Module):
    """KArAt attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; max_len: key positions the coefficients cover (inputs ``N <= max_len``);
        rank: ``r`` Fourier units; grid: ``G`` harmonics; causal: row ``i`` reads tokens ``<= i``.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = KArAtAttention(192, 3, max_len=197)(torch.randn(2, 197, 192))
    """

    def __init__(self, dim: int, num_heads: int = 3, max_len: int = 256, rank: int = 12, grid: int = 3,
                 causal: bool = False):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        divisible(self, dim, num_heads)
        self.max_len = int_option(self, "max_len", max_len, 1)
        self.rank = int_option(self, "rank", rank, 1)
        self.grid = int_option(self, "grid", grid, 1)
        if not isinstance(causal, bool):
            raise TypeError(f"{type(self).__name__}: causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        std = (max_len * grid) ** -0.5
        self.alpha = nn.Parameter(torch.randn(num_heads, rank, max_len, grid) * std)
        self.beta = nn.Parameter(torch.randn(num_heads, rank, max_len, grid) * std)
        self.w = nn.Parameter(torch.randn(num_heads, max_len, rank) * (rank * max_len) ** -0.5)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, N, C = x.shape
        if N > self.max_len:
            raise ValueError(f"{type(self).__name__}: x has {N} tokens, more than max_len={self.max_len} (KArAt's "
                             f"coefficients are indexed by key position)")
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, D)
        o = kat_attention(q, k, v, self.alpha, self.beta, self.w, causal=self.causal)
        return self.proj(o.reshape(B, N, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, max_len={self.max_len}, rank={self.rank}, "
                f"grid={self.grid}, causal={self.causal}")
