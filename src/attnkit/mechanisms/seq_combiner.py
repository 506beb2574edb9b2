"""Combiner: Full Attention Transformer with Sparse Computation Cost (arXiv 2107.05768).

Multi-head self-attention whose core is Combiner-Fixed (section 4.1): direct attention inside segments of
``segment`` tokens, max-pool summaries of the other segments, one softmax over both. The module holds the
projections and calls :func:`~attnkit.ops.sequence.combiner.combiner_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.sequence.combiner import combiner_attention
from attnkit.reference.naive_sequence2 import naive_combiner_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, s = cfg["batch"], cfg["seq_len"], cfg["dim"], min(cfg["segment"], cfg["seq_len"])
    m = -(-n // s)
    return b * (8 * n * c * c + 4 * n * c * (s + m) + 4 * n * c)


_DEFAULT = {"dim": 256, "num_heads": 4, "segment": 32, "causal": False}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="combiner", family=Family.DENSE,
    paper=Paper("Combiner: Full Attention Transformer with Sparse Computation Cost", "2107.05768", 2021),
    patterns=("noncausal-self", "causal-self"), complexity="O(N (s + N/s) C), O(N sqrt(N) C) at s = sqrt(N)",
    flops=_flops, options=_options, reference=naive_combiner_module, functional=combiner_attention,
    default_config=_DEFAULT, tiny_config={"dim": 8, "num_heads": 2, "segment": 3},
    default_input={"batch": 2, "seq_len": 1024}, tiny_input={"batch": 1, "seq_len": 7},
    notes="Combiner-Fixed with the code's identity-max summaries (max-pool of the scaled queries and of the keys "
          "over a segment; the summary value is the segment's attention under the pooled query). Non-causal "
          "queries see their own segment directly and only the OTHER segments' summaries: the reference TF code "
          "also keeps the own segment's summary, which double counts it and breaks the s = N identity, so we "
          "do not follow it there. A ragged last segment is allowed (pads never enter a max-pool or a summary). "
          "Axial, Logsparse and the learned (deepset) summaries are not implemented.",
)
class CombinerAttention(nn.Module):
    """Combiner-Fixed multi-head self-attention.

    Args:
        dim: ``C``; num_heads: ``H``; segment: segment length ``s`` (``sqrt(N)`` is the paper's choice);
        causal: causal self-attention (default False).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = CombinerAttention(256, 4, segment=32)(torch.randn(2, 1024, 256))
    """

    def __init__(self, dim: int, num_heads: int = 4, *, segment: int = 32, causal: bool = False):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        divisible(self, dim, num_heads)
        self.segment = int_option(self, "segment", segment, 1)
        self.causal = bool(causal)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, D)
        o = combiner_attention(q, k, v, segment=self.segment, causal=self.causal)  # (B, N, H, D)
        return self.proj(o.reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, segment={self.segment}, causal={self.causal}"
