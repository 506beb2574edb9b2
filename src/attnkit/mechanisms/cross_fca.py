"""Fcaformer: Forward Cross Attention in Hybrid Vision Transformer (arXiv 2211.07198).

Inside a stage, block ``l``'s attention sees its own tokens plus "cross tokens" merged from the earlier
blocks of the stage, each channel multiplied by a learnable scale factor (LSF) before use (§3.2); the
output keeps the block's ``N`` tokens. The attention is ``ak.attention`` over ``[x; alpha * cross]``: the
paper adds the wiring (which tokens become keys), not an attention operator.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_fca_module
from attnkit.registry import Family, Paper, check_input, divisible, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    m = cfg.get("context_len") or 0
    return 2 * b * (2 * n + 2 * (n + m)) * c * c + 4 * b * n * (n + m) * c


@register(
    name="fca", family=Family.CROSS,
    paper=Paper("Fcaformer: Forward Cross Attention in Hybrid Vision Transformer", "2211.07198", 2023),
    patterns=("noncausal-self", "noncausal-cross"), complexity="O(N (N + M) d)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"]},
    reference=naive_fca_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4}, tiny_config={"dim": 8, "num_heads": 2},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="The context holds the cross tokens of the earlier blocks, already merged (the paper's depthwise-conv "
          "token merge with a long stride, kernel = stride + 1, runs on each earlier block's map upstream) and "
          "concatenated; one learnable per-channel scale alpha (init 1) multiplies them, where the paper keeps "
          "one per earlier block (pass them pre-scaled to separate them). Without a context (the first block of "
          "a stage) the layer is standard MHSA.",
)
class ForwardCrossAttention(nn.Module):
    """Fcaformer's forward cross attention: queries of ``x`` over ``x`` and scaled cross tokens.

    Args:
        dim: ``C``; num_heads: ``H``.

    Shapes:
        ``x (B, N, C)``, optional cross tokens ``context (B, M, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = ForwardCrossAttention(256, 8)(x, torch.cat(merged_earlier_blocks, 1))
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        b, n, c = x.shape
        kv_in = x
        if context is not None:
            check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
            kv_in = torch.cat([x, context * self.alpha], 1)                        # (B, N + M, C): LSF on tokens
        q = self.q_proj(x).reshape(b, n, self.num_heads, -1)                        # (B, N, H, D)
        k, v = (t.reshape(b, kv_in.shape[1], self.num_heads, -1) for t in self.kv_proj(kv_in).chunk(2, -1))
        return self.proj(attention(q, k, v).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}"
