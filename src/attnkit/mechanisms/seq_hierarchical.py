"""Hierarchical Self-Attention: Generalizing Neural Attention Mechanics to Multi-Scale Problems (arXiv 2509.15448).

Multi-head self-attention over the balanced tree of the sequence (groups of ``branching`` consecutive tokens,
groups of groups, ...): exact inside a token's group, subtree means with a ``log |S|`` bonus above. The module
holds the projections and calls :func:`~attnkit.ops.sequence.hierarchical.hierarchical_attention`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.sequence.hierarchical import hierarchical_attention, uniform_hierarchy
from attnkit.reference.naive_sequence2 import naive_hierarchical_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, br = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["branching"]
    depth = max(1, math.ceil(math.log(max(n, 2), br)))
    return b * (8 * n * c * c + 4 * n * c * br * depth + 2 * n * c * depth)


_DEFAULT = {"dim": 128, "num_heads": 4, "branching": 16}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="hierarchical_attention", family=Family.DENSE,
    paper=Paper("Hierarchical Self-Attention: Generalizing Neural Attention Mechanics to Multi-Scale Problems",
                "2509.15448", 2025),
    patterns=("noncausal-self",), complexity="O(N b depth C) for branching b", flops=_flops, options=_options,
    reference=naive_hierarchical_module, functional=hierarchical_attention, default_config=_DEFAULT,
    tiny_config={"dim": 8, "num_heads": 2, "branching": 2}, default_input={"batch": 2, "seq_len": 1024},
    tiny_input={"batch": 1, "seq_len": 7},
    notes="The paper's closed form (entropy-minimising attention on nested signals) could not be read; this is the "
          "block form: a query attends its lowest group's leaves exactly and every sibling subtree S of its "
          "ancestors as one key (mean key, mean value, score + log|S|), so a subtree of identical keys counts as "
          "its |S| leaves and a one-group tree is softmax attention. Subtree means by DP (children's sums). "
          "The module builds the balanced tree over token order; the op takes any tree (parent lists). "
          "Non-causal only.",
)
class HierarchicalAttention(nn.Module):
    """Hierarchical multi-head self-attention over the balanced tree of the sequence.

    Args:
        dim: ``C``; num_heads: ``H``; branching: children per tree node ``b`` (the lowest groups are ``b``
        consecutive tokens).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = HierarchicalAttention(128, 4, branching=16)(torch.randn(2, 1024, 128))
    """

    def __init__(self, dim: int, num_heads: int = 4, *, branching: int = 16):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        divisible(self, dim, num_heads)
        self.branching = int_option(self, "branching", branching, 2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, D)
        o = hierarchical_attention(q, k, v, uniform_hierarchy(N, self.branching))  # (B, N, H, D)
        return self.proj(o.reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, branching={self.branching}"
