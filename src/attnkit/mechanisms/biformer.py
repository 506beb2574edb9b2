"""BiFormer: Vision Transformer with Bi-Level Routing Attention (arXiv 2303.08810).

The map is split into ``S x S`` regions; region-mean queries and keys give a region affinity,
each region routes to its top-k regions, and its tokens attend to the tokens of those regions
(the block-gather engine, with regions made contiguous). A depthwise conv on V (local
context enhancement, LCE) is added before the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.routed.biformer import bi_level_routing_attention
from attnkit.reference.naive_modules import naive_biformer_module
from attnkit.registry import Family, InputKind, Paper, register


def _flops(cfg: dict) -> float:
    b, s, c, n_win, k = cfg["batch"], cfg["size"], cfg["dim"], cfg["n_win"], cfg["topk"]
    n = s * s
    return 8 * b * n * c * c + 2 * b * n_win ** 4 * c + 4 * b * n * k * (n // n_win ** 2) * c + 50 * b * n * c


_DEFAULT = {"batch": 2, "size": 8, "dim": 32, "num_heads": 2, "n_win": 4, "topk": 4}
_TINY = {"batch": 1, "size": 4, "dim": 8, "n_win": 2, "topk": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "n_win": c["n_win"], "topk": c["topk"]}


@register(
    name="biformer", family=Family.ROUTED,
    paper=Paper("BiFormer: Vision Transformer with Bi-Level Routing Attention", "2303.08810", 2023),
    patterns=("noncausal-self",), complexity="O((YX)^(4/3) C) at the optimal S", flops=_flops,
    options=_options, reference=naive_biformer_module, functional=bi_level_routing_attention,
    default_config=_DEFAULT, tiny_config=_TINY, input_kind=InputKind.IMAGE,
    shape=lambda c: (c["batch"], c["size"], c["size"], c["dim"]),
    notes="Scale (H*D)^-1/2 for routing and tokens (the reference's choice); routing detached, shared by "
          "heads, no forced self-region, ties to the lower region; LCE = depthwise 5x5 conv on v added "
          "before W_o; no KV downsampling; grid must be divisible by n_win (no auto-pad).",
)
class BiLevelRoutingAttention(nn.Module):
    """BRA token mixer.

    Args:
        dim: ``C``; num_heads: ``H``; n_win: ``S`` regions per side; topk: routed regions;
        lce_kernel: LCE depthwise kernel (5; 0 disables).

    Shapes:
        ``x (B, Y, X, C)`` channels-last -> ``(B, Y, X, C)``.

    Example:
        >>> y = BiLevelRoutingAttention(64, 2, n_win=7, topk=4)(torch.randn(2, 28, 28, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, n_win: int = 7, topk: int = 4, lce_kernel: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.n_win, self.topk = num_heads, n_win, topk
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.lce = nn.Conv2d(dim, dim, lce_kernel, padding=lce_kernel // 2, groups=dim) if lce_kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, Y, X, C) channels-last, got shape {tuple(x.shape)}")
        b, yy, xx, c = x.shape
        q, k, v = self.qkv(x).view(b, yy, xx, 3, self.num_heads, c // self.num_heads).unbind(3)  # (B, Y, X, H, D)
        o = bi_level_routing_attention(q, k, v, self.n_win, self.topk).reshape(b, yy, xx, c)
        if self.lce is not None:
            vc = v.reshape(b, yy, xx, c).permute(0, 3, 1, 2).contiguous()  # (B, C, Y, X)
            o = o + F.conv2d(vc, self.lce.weight, self.lce.bias, padding=self.lce.padding,
                             groups=c).permute(0, 2, 3, 1)  # (B, Y, X, C)
        return self.proj(o)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"

