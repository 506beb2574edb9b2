"""CCNet criss-cross attention: each pixel attends to its row and its column (centre counted once).

"CCNet: Criss-Cross Attention for Semantic Segmentation", arXiv 1811.11721 (ICCV 2019).
One joint softmax over the ``Y + X - 1`` positions; no logit
scaling; ``out = gamma * attn + x`` with ``gamma`` initialised to 0; recurrence ``R`` reuses
the same weights (RCCA, ``R = 2`` gives full reachability).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.local.criss_cross import criss_cross_attention
from attnkit.reference.naive_modules import naive_criss_cross
from attnkit.registry import Family, InputKind, Paper, check_input, float_option, int_option, register


class CrissCrossAttention(nn.Module):
    """CCNet (recurrent) criss-cross attention on CNN feature maps ``(B, C, Y, X)``.

    1x1 convs give ``Q, K`` with ``C // reduction`` channels and ``V`` with ``C``; the output is
    ``gamma * CCA(x) + x``, applied ``recurrence`` times with shared weights.
    """

    def __init__(self, in_channels: int, reduction: int = 8, recurrence: int = 1, num_heads: int = 1,
                 gamma_init: float = 0.0):
        super().__init__()
        int_option(self, "in_channels", in_channels, 1)
        int_option(self, "reduction", reduction, 1)
        int_option(self, "recurrence", recurrence, 1)
        int_option(self, "num_heads", num_heads, 1)
        float_option(self, "gamma_init", gamma_init)
        cq = max(1, in_channels // reduction)
        if cq % num_heads or in_channels % num_heads:
            raise ValueError(f"{type(self).__name__}: channels ({cq}, {in_channels}) must be multiples of num_heads "
                             f"({num_heads})")
        self.in_channels = in_channels
        self.num_heads, self.recurrence = num_heads, recurrence
        self.query = nn.Conv2d(in_channels, cq, 1)
        self.key = nn.Conv2d(in_channels, cq, 1)
        self.value = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, C, Y, X = t.shape
        return t.permute(0, 2, 3, 1).reshape(B, Y, X, self.num_heads, C // self.num_heads)  # (B, Y, X, H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, Y, X)`` -> ``(B, C, Y, X)``."""
        check_input(self, x, "(B, C, Y, X)", channels=self.in_channels)
        for _ in range(self.recurrence):
            q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
            out = criss_cross_attention(q, k, v)  # (B, Y, X, H, Dv)
            out = out.reshape(*out.shape[:3], -1).permute(0, 3, 1, 2)  # (B, C, Y, X)
            x = self.gamma * out + x
        return x


def _flops(cfg: dict) -> float:
    B, C = cfg.get("batch", 1), cfg["in_channels"]
    Y, X = cfg["input_size"]
    cq = C // cfg.get("reduction", 8)
    per = 2 * Y * X * C * (2 * cq + C) + 2 * Y * X * (Y + X - 1) * (cq + C)
    return float(B * cfg.get("recurrence", 1) * per)


_DEFAULT = {"in_channels": 16, "reduction": 8, "recurrence": 2, "gamma_init": 0.5}
_TINY = {"in_channels": 8, "reduction": 4}


def _options(c: dict) -> dict:
    return {"in_channels": c["in_channels"], "reduction": c["reduction"], "recurrence": c["recurrence"],
            "gamma_init": c["gamma_init"]}


register(name="criss_cross", family=Family.LOCAL,
         paper=Paper("CCNet: Criss-Cross Attention for Semantic Segmentation", "1811.11721", 2018),
         patterns=("noncausal-self",), complexity="O(N (Y + X) C)", flops=_flops, options=_options,
         reference=naive_criss_cross, functional=criss_cross_attention, default_config=_DEFAULT, tiny_config=_TINY,
         default_input={"batch": 2, "input_size": (6, 7)}, tiny_input={"batch": 1, "input_size": (3, 4)},
         shape=lambda c: (c["batch"], c["in_channels"], *c["input_size"]),
         notes="Centre kept in the row branch, removed from the column branch (one joint softmax); no scaling. "
               "The paper initialises gamma to 0 (gamma_init=0.0, the class default); the example uses 0.5 "
               "so that attention gradients are exercised. Single head as in the paper (num_heads option).",
         input_kind=InputKind.CNN)(CrissCrossAttention)

