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

from attnkit._validate import check_qkv
from attnkit.backends.block_gather import block_gather_attention
from attnkit.registry import Paper, register


def _to_regions(x: torch.Tensor, s: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> region-major tokens ``(B, S*S*m, H, D)``, ``m = (Y/S)(X/S)``."""
    b, yy, xx, h, d = x.shape
    x = x.view(b, s, yy // s, s, xx // s, h, d).permute(0, 1, 3, 2, 4, 5, 6)  # (B, S, S, Y/S, X/S, H, D)
    return x.reshape(b, yy * xx, h, d)


def _from_regions(x: torch.Tensor, s: int, yy: int, xx: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions`: ``(B, Y*X, H, D)`` -> ``(B, Y, X, H, D)``."""
    b, _, h, d = x.shape
    x = x.view(b, s, s, yy // s, xx // s, h, d).permute(0, 1, 3, 2, 4, 5, 6)  # (B, S, Y/S, S, X/S, H, D)
    return x.reshape(b, yy, xx, h, d)


def region_routes(q: torch.Tensor, k: torch.Tensor, n_win: int, topk: int, scale: float) -> torch.Tensor:
    """Bool routing layout ``(B, 1, R, R)``: region ``r`` attends region ``j`` iff ``j`` is among
    the top-k of ``(mean q_r · scale) · mean k_j``; one decision for all heads (full q/k width),
    no gradient, ties to the lower region index."""
    b = q.shape[0]
    r = n_win * n_win
    qbar = _to_regions(q.detach(), n_win).reshape(b, r, -1, q.shape[-2] * q.shape[-1]).mean(2)  # (B, R, H*D)
    kbar = _to_regions(k.detach(), n_win).reshape(b, r, -1, k.shape[-2] * k.shape[-1]).mean(2)  # (B, R, H*D)
    aff = (qbar * scale) @ kbar.transpose(-1, -2)  # (B, R, R)
    idx = torch.sort(aff, dim=-1, descending=True, stable=True).indices[..., :topk]
    return torch.zeros_like(aff, dtype=torch.bool).scatter_(-1, idx, True).unsqueeze(1)  # (B, 1, R, R)


def bi_level_routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, topk: int, *,
                               scale: float | None = None, return_layout: bool = False):
    """Bi-level routing attention on a 2-D grid.

    Args:
        q, k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)`` (same heads; routing uses all heads).
        n_win: regions per side ``S`` (``Y % S == X % S == 0``); topk: routed regions per region.
        scale: token and routing logit scale; default ``(H*D) ** -0.5`` (the reference's full
            q/k width, not the head dim).

    Returns:
        ``(B, Y, X, H, Dv)``; with ``return_layout`` also the ``(B, 1, R, R)`` routing layout.

    Example:
        >>> q = k = v = torch.randn(1, 16, 16, 4, 16)
        >>> out = bi_level_routing_attention(q, k, v, n_win=4, topk=4)
    """
    check_qkv(q, k, v, spatial_rank=2, same_extent=True)
    _, yy, xx, h, d = q.shape
    if isinstance(n_win, bool) or not isinstance(n_win, int) or n_win < 1 or yy % n_win or xx % n_win:
        raise ValueError(f"n_win must be a positive int dividing the grid ({yy}, {xx}), got {n_win!r}")
    r = n_win * n_win
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= r:
        raise ValueError(f"topk must be in [1, number of regions = n_win^2 = {r}], got {topk!r}")
    if k.shape[-2] != h:
        raise ValueError("bi_level_routing_attention needs as many key as query heads (routing concatenates heads)")
    scale = (h * d) ** -0.5 if scale is None else scale
    layout = region_routes(q, k, n_win, topk, scale)
    m = (yy // n_win) * (xx // n_win)
    qr, kr, vr = (_to_regions(t, n_win) for t in (q, k, v))  # (B, R*m, H, D)
    out = block_gather_attention(qr, kr, vr, layout, m, scale=scale)  # (B, R*m, H, Dv)
    out = _from_regions(out, n_win, yy, xx)
    return (out, layout) if return_layout else out


def _flops(cfg: dict) -> float:
    b, s, c, n_win, k = cfg["batch"], cfg["size"], cfg["dim"], cfg["n_win"], cfg["topk"]
    n = s * s
    return 8 * b * n * c * c + 2 * b * n_win ** 4 * c + 4 * b * n * k * (n // n_win ** 2) * c + 50 * b * n * c


_DEFAULT = {"batch": 2, "size": 8, "dim": 32, "num_heads": 2, "n_win": 4, "topk": 4}


def _example(config: dict | None = None):
    c = {**_DEFAULT, **(config or {})}
    m = BiLevelRoutingAttention(c["dim"], c["num_heads"], n_win=c["n_win"], topk=c["topk"])
    return m, (torch.randn(c["batch"], c["size"], c["size"], c["dim"]),)


@register(
    name="biformer", family="sparse",
    paper=Paper("BiFormer: Vision Transformer with Bi-Level Routing Attention", "2303.08810", 2023),
    patterns=("noncausal-self",), complexity="O((YX)^(4/3) C) at the optimal S", flops=_flops,
    example=_example, default_config=_DEFAULT, input_kind="image",
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
