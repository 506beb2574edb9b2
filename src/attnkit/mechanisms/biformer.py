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
from attnkit.registry import Family, InputKind, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, s, c, n_win, k = cfg["batch"], cfg["size"], cfg["dim"], cfg["n_win"], cfg["topk"]
    n = s * s
    return 8 * b * n * c * c + 2 * b * n_win ** 4 * c + 4 * b * n * k * (n // n_win ** 2) * c + 50 * b * n * c


_DEFAULT = {"dim": 32, "num_heads": 2, "n_win": 4, "topk": 4}
_TINY = {"dim": 8, "n_win": 2, "topk": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "n_win": c["n_win"], "topk": c["topk"]}


@register(
    name="biformer", family=Family.ROUTED,
    paper=Paper("BiFormer: Vision Transformer with Bi-Level Routing Attention", "2303.08810", 2023),
    patterns=("noncausal-self",), complexity="O((YX)^(4/3) C) at the optimal S", flops=_flops,
    options=_options, reference=naive_biformer_module, functional=bi_level_routing_attention,
    default_config=_DEFAULT, tiny_config=_TINY, input_kind=InputKind.IMAGE,
    default_input={"batch": 2, "size": 8}, tiny_input={"batch": 1, "size": 4},
    shape=lambda c: (c["batch"], c["size"], c["size"], c["dim"]),
    notes="Scale (H*D)^-1/2 for routing and tokens (the reference's choice); routing detached, shared by "
          "heads, no forced self-region, ties to the lower region; LCE = depthwise 5x5 conv on v added "
          "before W_o; no KV downsampling. A map whose sides n_win does not divide is zero-padded at the bottom and "
          "right (before the qkv projection, so padded tokens are keys) and the output cropped, as the reference "
          "code's auto_pad does.",
)
class BiLevelRoutingAttention(nn.Module):
    """BRA token mixer.

    Args:
        dim: ``C``; num_heads: ``H``; n_win: ``S`` regions per side; topk: routed regions;
        lce_kernel: LCE depthwise kernel (5; 0 disables).

    Shapes:
        ``x (B, Y, X, C)`` channels-last -> ``(B, Y, X, C)``. Sides that ``n_win`` does not divide are
        zero-padded at the bottom / right up to a multiple of ``n_win`` and the output cropped back (the
        reference code's ``auto_pad``); the padded tokens take part as keys.

    Example:
        >>> y = BiLevelRoutingAttention(64, 2, n_win=7, topk=4)(torch.randn(2, 28, 28, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, n_win: int = 7, topk: int = 4, lce_kernel: int = 5):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.n_win, self.topk = int_option(self, "n_win", n_win, 1), int_option(self, "topk", topk, 1)
        if topk > n_win * n_win:
            raise ValueError(f"{type(self).__name__}: topk must be in [1, n_win^2 = {n_win * n_win}], got {topk}")
        int_option(self, "lce_kernel", lce_kernel, 0)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.lce = nn.Conv2d(dim, dim, lce_kernel, padding=lce_kernel // 2, groups=dim) if lce_kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, Y, X, C)", channels=self.dim, meta="region routing depends on the values")
        y_in, x_in = x.shape[1:3]
        # the reference code's auto_pad: zeros at the bottom / right up to a multiple of n_win, cropped at the end
        x = F.pad(x, (0, 0, 0, -x_in % self.n_win, 0, -y_in % self.n_win))  # (B, Y', X', C)
        b, yy, xx, c = x.shape
        q, k, v = self.qkv(x).view(b, yy, xx, 3, self.num_heads, c // self.num_heads).unbind(3)  # (B, Y, X, H, D)
        o = bi_level_routing_attention(q, k, v, self.n_win, self.topk).reshape(b, yy, xx, c)
        if self.lce is not None:
            vc = v.reshape(b, yy, xx, c).permute(0, 3, 1, 2).contiguous()  # (B, C, Y, X)
            o = o + F.conv2d(vc, self.lce.weight, self.lce.bias, padding=self.lce.padding,
                             groups=c).permute(0, 2, 3, 1)  # (B, Y, X, C)
        return self.proj(o)[:, :y_in, :x_in]  # (B, Y, X, C)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"

