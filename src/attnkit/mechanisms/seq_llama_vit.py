"""Adapting LLaMA Decoder to Vision Transformer (arXiv 2404.06773) — iLLaMA's attention layer.

Multi-head causal self-attention over ``[patches; class token]``: the input's LAST token is the post-sequence
class token, which sees every patch while patches never see it. ``alpha`` is the soft mask (1 = bidirectional,
0 = causal; anneal with :func:`~attnkit.ops.sequence.llama_vit.soft_mask_alpha`). The module holds the
projections and calls :func:`~attnkit.ops.sequence.llama_vit.soft_causal_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.sequence.llama_vit import soft_causal_attention
from attnkit.reference.naive_sequence2 import naive_llama_vit_module
from attnkit.registry import Family, Paper, check_input, divisible, float_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    pairs = n * (n + 1) / 2 if cfg["alpha"] == 0 else n * n
    return b * (8 * n * c * c + 4 * pairs * c)


_DEFAULT = {"dim": 192, "num_heads": 3, "alpha": 0.0}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="llama_vit_causal", family=Family.DENSE,
    paper=Paper("Adapting LLaMA Decoder to Vision Transformer", "2404.06773", 2024),
    patterns=("causal-self",), complexity="O(N^2 C / 2)", flops=_flops, options=_options,
    reference=naive_llama_vit_module, functional=soft_causal_attention, default_config=_DEFAULT,
    tiny_config={"dim": 8, "num_heads": 2}, default_input={"batch": 2, "seq_len": 197},
    tiny_input={"batch": 1, "seq_len": 7},
    notes="The attention layer only (RMSNorm, SwiGLU and RoPE of the iLLaMA block are not part of it): causal "
          "attention with the class token expected as the LAST input token. The soft mask's form (future weights "
          "times alpha, alpha linear from 1 to 0 over the first soft epochs) is our reading of the paper; "
          "alpha is a module option (default 0 = causal).",
)
class LlamaViTAttention(nn.Module):
    """iLLaMA attention: causal over ``[patches; cls]`` with an optional soft mask.

    Args:
        dim: ``C``; num_heads: ``H``; alpha: soft-mask weight of future keys (0 = causal, the default).

    Shapes:
        ``x (B, N, C)`` (last token = class token) -> ``(B, N, C)``.

    Example:
        >>> y = LlamaViTAttention(192, 3)(torch.randn(2, 197, 192))
    """

    def __init__(self, dim: int, num_heads: int = 3, *, alpha: float = 0.0):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        divisible(self, dim, num_heads)
        self.alpha = float_option(self, "alpha", alpha, minimum=0.0)
        if self.alpha > 1.0:
            raise ValueError(f"{type(self).__name__}: alpha must be in [0, 1], got {alpha}")
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, D)
        return self.proj(soft_causal_attention(q, k, v, alpha=self.alpha).reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, alpha={self.alpha}"
