"""SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design (arXiv 2401.16456) —
single-head self-attention (SHSA) on a channel slice.

One attention head (``d_qk = 16``) runs on the first ``C_p`` channels (GroupNorm first); the
other channels pass through untouched and are concatenated back before ReLU and a projection.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.dense.call import attention
from attnkit.reference.naive_modules import naive_single_head
from attnkit.registry import Family, InputKind, Paper, check_input, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, cp, d = cfg["batch"], cfg["size"] ** 2, cfg["dim"], cfg["partial_dim"], cfg["qk_dim"]
    return 2 * b * n * (cp * (2 * d + cp) + c * c) + 2 * b * n * n * (d + cp)


_DEFAULT = {"dim": 48, "partial_dim": 12, "qk_dim": 16}
_TINY = {"dim": 12, "partial_dim": 4, "qk_dim": 4}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "partial_dim": c["partial_dim"], "qk_dim": c["qk_dim"]}


@register(
    name="single_head", family=Family.VISION,
    paper=Paper("SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design", "2401.16456", 2024),
    patterns=("noncausal-self",), complexity="O(N^2 (d_qk + C_p) + N C^2)", flops=_flops,
    options=_options, reference=naive_single_head, functional=attention, default_config=_DEFAULT,
    tiny_config=_TINY, default_input={"batch": 2, "size": 6}, tiny_input={"batch": 1, "size": 3},
    input_kind=InputKind.IMAGE, shape=lambda c: (c["batch"], c["size"], c["size"], c["dim"]),
    notes="Channels-last input. The 1x1 conv + BN projections are Linear layers (BN folded; no train/eval "
          "difference); the output projection's BN (zero-init in the paper) is omitted. The residual and "
          "the DWConv/FFN of the SHViT block are outside this module. C_p need not divide C.",
)
class SingleHeadAttention(nn.Module):
    """SHSA token mixer.

    Args:
        dim: channels ``C``; partial_dim: attention channels ``C_p`` (paper: about ``C / 4.67``);
        qk_dim: query/key width (16).

    Shapes:
        ``x (B, Y, X, C)`` channels-last -> ``(B, Y, X, C)``.

    Example:
        >>> y = SingleHeadAttention(128, 32)(torch.randn(2, 14, 14, 128))
    """

    def __init__(self, dim: int, partial_dim: int, *, qk_dim: int = 16):
        super().__init__()
        int_option(self, "dim", dim, 1)
        int_option(self, "qk_dim", qk_dim, 1)
        if not 0 < int_option(self, "partial_dim", partial_dim, 1) <= dim:
            raise ValueError(f"{type(self).__name__}: partial_dim must be in [1, dim={dim}], got {partial_dim}")
        self.dim, self.partial_dim, self.qk_dim = dim, partial_dim, qk_dim
        self.norm = nn.GroupNorm(1, partial_dim)
        self.qk = nn.Linear(partial_dim, 2 * qk_dim)
        self.v = nn.Linear(partial_dim, partial_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        b, yy, xx, c = x.shape
        x1, x2 = x.split([self.partial_dim, c - self.partial_dim], dim=-1)
        # .contiguous(): GroupNorm's CPU backward segfaults (torch 2.13) on a strided input that
        # does not require grad (here a channel slice of a permuted tensor)
        x1 = self.norm(x1.permute(0, 3, 1, 2).contiguous())  # (B, C_p, Y, X)
        x1 = x1.permute(0, 2, 3, 1).reshape(b, yy * xx, 1, -1)  # (B, N, 1, C_p)
        q, k = self.qk(x1).chunk(2, dim=-1)  # (B, N, 1, d_qk)
        o = attention(q, k, self.v(x1))  # (B, N, 1, C_p): one head
        y = torch.cat([o.view(b, yy, xx, -1), x2], dim=-1)  # (B, Y, X, C)
        return self.proj(torch.relu(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, partial_dim={self.partial_dim}, qk_dim={self.qk_dim}"
