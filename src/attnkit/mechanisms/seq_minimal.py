"""Reducing the Transformer Architecture to a Minimum (arXiv 2410.13732).

One attention layer whose query-key and value-output products take the paper's reduced forms (section 3):
``qk`` in separate / collapsed / shared (``W_Q = W_K``) / cholesky (``W_QK = L L^T``), ``vo`` in separate /
collapsed / identity (no ``W_V``, ``W_O``). The module holds the weights and calls
:func:`~attnkit.ops.sequence.minimal.minimal_attention`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.sequence.minimal import QK_FORMS, VO_FORMS, minimal_attention
from attnkit.reference.naive_sequence import naive_minimal_module
from attnkit.registry import Family, Paper, check_input, choice_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    d = c if cfg["qk"] == "collapsed" else c // h
    dv = c if cfg["vo"] != "separate" else c // h
    proj = {"separate": 2, "shared": 1, "cholesky": 1, "collapsed": h}[cfg["qk"]] * 2 * n * c * c
    proj += {"separate": 2, "collapsed": h, "identity": 0}[cfg["vo"]] * 2 * n * c * c
    return b * (proj + 2 * h * n * n * (d + dv))


_DEFAULT = {"dim": 64, "num_heads": 1, "qk": "shared", "vo": "identity", "causal": False}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="minimal_attention", family=Family.DENSE,
    paper=Paper("Reducing the Transformer Architecture to a Minimum", "2410.13732", 2024),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 C)", flops=_flops, options=_options,
    reference=naive_minimal_module, functional=minimal_attention, default_config=_DEFAULT,
    tiny_config={"dim": 8, "num_heads": 2}, default_input={"batch": 2, "seq_len": 128},
    tiny_input={"batch": 1, "seq_len": 7},
    notes="Collapsed W_QK keeps W_K = I as the paper's Keras code (q_h = x W_QK^h, k = x, scale 1/sqrt(C)); "
          "multi-head collapsed V/O sums A_h x W_VO^h over heads and identity V/O averages A_h x (the paper's "
          "single-head forms for H = 1). Cholesky uses the lower triangle of one C x C weight as L.",
)
class MinimalAttention(nn.Module):
    """Minimal attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; qk: ``"separate"``, ``"collapsed"``, ``"shared"`` or ``"cholesky"``;
        vo: ``"separate"``, ``"collapsed"`` or ``"identity"``; causal: causal self-attention (default False).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = MinimalAttention(64, 1, qk="shared", vo="identity")(torch.randn(2, 128, 64))
    """

    def __init__(self, dim: int, num_heads: int = 1, *, qk: str = "shared", vo: str = "identity",
                 causal: bool = False):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        self.qk = choice_option(self, "qk", qk, QK_FORMS)
        self.vo = choice_option(self, "vo", vo, VO_FORMS)
        if qk != "collapsed" and dim % num_heads:
            raise ValueError(f"{type(self).__name__}: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.causal = bool(causal)
        s = 1 / math.sqrt(dim)
        qk_shape = {"separate": (2, dim, dim), "collapsed": (num_heads, dim, dim)}.get(qk, (dim, dim))
        self.qk_weight = nn.Parameter(torch.randn(qk_shape) * s)
        self.vo_weight = None if vo == "identity" else nn.Parameter(
            torch.randn((2, dim, dim) if vo == "separate" else (num_heads, dim, dim)) * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        return minimal_attention(x, self.qk_weight, self.vo_weight, num_heads=self.num_heads, qk=self.qk,
                                 vo=self.vo, causal=self.causal)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, qk={self.qk}, vo={self.vo}, causal={self.causal}"
