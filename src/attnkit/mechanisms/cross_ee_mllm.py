"""EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model (arXiv 2408.11795).

Composite attention (§3.2) replaces the LLM's self-attention on ``[visual tokens; text tokens]``: no
attention among visual tokens (each visual row's output is its own value, re-using the layer's weights
as an aligner), causal attention for the text. The op is
:func:`~attnkit.ops.cross.composite.composite_attention`, whose ``split`` path spends no attention on
the visual rows.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.cross.composite import composite_attention
from attnkit.reference.naive_cross import naive_ee_mllm_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, nv = cfg["batch"], cfg["seq_len"], cfg["dim"], min(cfg["num_visual"], cfg["seq_len"])
    nt = n - nv
    return 2 * b * n * 4 * c * c + 4 * b * (nt * nv + nt * (nt + 1) / 2) * c


@register(
    name="ee_mllm_composite", family=Family.CROSS,
    paper=Paper("EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model", "2408.11795",
                2024),
    patterns=("causal-self",), complexity="O(Nv d^2 + Nt (Nv + Nt) d)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "num_visual": c["num_visual"]},
    reference=naive_ee_mllm_module, functional=composite_attention,
    default_config={"dim": 64, "num_heads": 4, "num_visual": 48},
    tiny_config={"dim": 8, "num_heads": 2, "num_visual": 3},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Visual tokens first, then text (the layout the mask assumes); a sequence shorter than num_visual is all "
          "visual. The visual rows keep the layer's output projection (out = W_o W_v x_v); the surrounding norms "
          "and FFN are outside this layer. The pattern is causal (a visual row sees only itself).",
)
class CompositeAttention(nn.Module):
    """EE-MLLM's composite attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; num_visual: ``Nv``, the leading visual tokens.

    Shapes:
        ``x (B, Nv + Nt, C)`` -> ``(B, Nv + Nt, C)``.

    Example:
        >>> y = CompositeAttention(4096, 32, num_visual=576)(torch.cat([visual, text], 1))
    """

    def __init__(self, dim: int, num_heads: int, *, num_visual: int = 576, qkv_bias: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.num_visual = int_option(self, "num_visual", num_visual, 0)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="the causal text rows run the blocked tile walk")
        b, n, c = x.shape
        q, k, v = (t.reshape(b, n, self.num_heads, -1) for t in self.qkv(x).chunk(3, -1))   # (B, N, H, D)
        return self.proj(composite_attention(q, k, v, min(self.num_visual, n)).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, num_visual={self.num_visual}"
