"""Attention Is All You Need (arXiv 1706.03762) — multi-head attention, with the grouped-query
(GQA, arXiv 2305.13245) and multi-query (MQA, arXiv 1911.02150) variants as a head-count setting.

Projection -> ``ak.attention`` -> projection; masks, backends and cross-attention come from the op.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.masks import Mask, causal
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_modules import naive_mha
from attnkit.registry import Family, Paper, check_input, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    hkv = cfg.get("num_kv_heads") or h
    d = c // h
    proj = 2 * b * n * c * (c + 2 * hkv * d + c)        # q, k, v, out projections
    return proj + 4 * b * h * n * n * d                  # QK^T and PV


def _options(cfg: dict) -> dict:
    return {"dim": cfg["dim"], "num_heads": cfg["num_heads"], "num_kv_heads": cfg.get("num_kv_heads"),
            "causal": cfg["causal"]}


_DEFAULT = {"dim": 64, "num_heads": 4, "num_kv_heads": 2, "causal": True}
_TINY = {"dim": 8, "num_heads": 2, "num_kv_heads": 1}


@register(
    name="mha",
    family=Family.DENSE,
    paper=Paper("Attention Is All You Need", "1706.03762", 2017),
    patterns=("noncausal-self", "causal-self", "noncausal-cross", "causal-cross"),
    complexity="O(N^2 d)",
    flops=_flops,
    options=_options,
    reference=naive_mha,
    functional=attention,
    default_config=_DEFAULT,
    tiny_config=_TINY,
    default_input={"batch": 2, "seq_len": 64},
    tiny_input={"batch": 1, "seq_len": 6},
    notes="GQA/MQA via num_kv_heads (arXiv 2305.13245); causal cross-attention is top-left aligned "
          "(query i sees context 0..i) unless a mask is given. "
          "Conditional Cross Attention Network for Multi-Space Embedding without Entanglement in Only a SINGLE "
          "Network (arXiv 2307.13254) adds no op: its condition embedding is the query of plain cross-attention "
          "over the ViT patch tokens (learned-query attention pooling), i.e. mha(condition_tokens, context="
          "patch_tokens) or ak.attention. "
          "TransVG: End-to-End Visual Grounding with Transformers (arXiv 2104.08541) adds no op: its "
          "visual-linguistic transformer is plain self-attention over the concatenation [REG; visual; text] "
          "with the text padding as a key-padding mask, i.e. mha on the concatenated tokens with "
          "ak.masks key padding.",
)
class MultiHeadAttention(nn.Module):
    """Multi-head (and grouped-/multi-query) attention over sequences.

    Args:
        dim: model width ``C``.
        num_heads: query heads ``Hq``; head dim ``C // Hq`` unless ``head_dim`` is given.
        num_kv_heads: key/value heads (``Hq`` for MHA, 1 for MQA, between for GQA).
        causal: apply ``ak.masks.causal()`` when no mask is passed to ``forward``.
        mask: a default mask pattern for every call.
        backend: forwarded to ``ak.attention``.

    Shapes:
        ``x (B, N, C)``, optional ``context (B, M, C)`` for cross-attention -> ``(B, N, C)``.

    Example:
        >>> m = ak.get("mha", dim=256, num_heads=8, num_kv_heads=2, causal=True)
        >>> y = m(torch.randn(2, 128, 256))
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = False, causal: bool = False, mask: Mask | None = None, backend: str | None = None):
        super().__init__()
        int_option(self, "dim", dim, 1)
        int_option(self, "num_heads", num_heads, 1)
        num_kv_heads = num_heads if num_kv_heads is None else int_option(self, "num_kv_heads", num_kv_heads, 1)
        if head_dim is not None:
            int_option(self, "head_dim", head_dim, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"{type(self).__name__}: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"{type(self).__name__}: dim ({dim}) must be divisible by num_heads ({num_heads}) "
                             "or head_dim given")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = head_dim or dim // num_heads
        self.causal, self.mask, self.backend = causal, mask, backend
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.kv_proj = nn.Linear(dim, 2 * num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        ctx = x if context is None else check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)                    # (B, N, Hq, D)
        k, v = self.kv_proj(ctx).view(b, ctx.shape[1], 2, self.num_kv_heads, self.head_dim).unbind(2)  # (B, M, Hkv, D)
        if mask is None:
            mask = self.mask if self.mask is not None else (causal() if self.causal else None)
        out = attention(q, k, v, mask=mask, backend=self.backend)                       # (B, N, Hq, D)
        return self.out_proj(out.reshape(b, n, -1))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, mask={self.mask!r}")
