"""Spatial-Aware Token for Weakly Supervised Object Localization (arXiv 2303.10438).

A learnable spatial token sits next to the patch tokens; in the last blocks its query scores every
patch, and the head-averaged scores through a sigmoid form a foreground map (§3.2), computed by
:func:`~attnkit.ops.cross.spatial_token.spatial_token_map`. This layer applies the map: patch tokens are
multiplied by their probability and the spatial token gathers the probability-weighted mean of the patch
values.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.cross.spatial_token import spatial_token_map
from attnkit.reference.naive_cross import naive_sat_module
from attnkit.registry import Family, Paper, check_input, divisible, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    return 2 * b * (2 * n + 2) * c * c + 4 * b * n * c


@register(
    name="sat_token", family=Family.CROSS,
    paper=Paper("Spatial-Aware Token for Weakly Supervised Object Localization", "2303.10438", 2023),
    patterns=("noncausal-self",), complexity="O(N d^2 + N d)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"]},
    reference=naive_sat_module, functional=spatial_token_map,
    default_config={"dim": 64, "num_heads": 4}, tiny_config={"dim": 8, "num_heads": 2},
    default_input={"batch": 2, "seq_len": 197}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Inferred: a sigmoid per patch (not a softmax: patches are independent), patch tokens multiplied by the "
          "map, the spatial token updated with the map-weighted mean of the patch values through an output "
          "projection. Token 0 of x is the spatial token (put [CLS] elsewhere). foreground_map(x) gives (B, N); "
          "the final map (mean over the last three blocks) and the losses are training code.",
)
class SpatialTokenAttention(nn.Module):
    """SAT's spatial-query attention on ``[spatial token; patch tokens]``.

    Args:
        dim: ``C``; num_heads: ``H``.

    Shapes:
        ``x (B, 1 + N, C)`` -> ``(B, 1 + N, C)``; :meth:`foreground_map` -> ``(B, N)``.

    Example:
        >>> m = SpatialTokenAttention(384, 6)
        >>> y, fg = m(tokens), m.foreground_map(tokens).view(-1, 14, 14)
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def foreground_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` foreground probability of every patch token of ``x (B, 1 + N, C)``."""
        check_input(self, x, "(B, N, C)", channels=self.dim)
        if x.shape[1] < 2:
            raise ValueError(f"{type(self).__name__}: x needs the spatial token and at least one patch, got N = 1")
        b, n, _ = x.shape
        q = self.q_proj(x[:, :1]).reshape(b, 1, self.num_heads, -1)                # (B, 1, H, D)
        k = self.k_proj(x[:, 1:]).reshape(b, n - 1, self.num_heads, -1)            # (B, N - 1, H, D)
        return spatial_token_map(q, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = self.foreground_map(x)                                              # (B, N - 1)
        w = prob[..., None]
        pooled = (w * self.v_proj(x[:, 1:])).sum(1, keepdim=True) / w.sum(1, keepdim=True)   # (B, 1, C)
        return torch.cat([x[:, :1] + self.out_proj(pooled), x[:, 1:] * w], 1)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}"
