"""BiFormer: Vision Transformer with Bi-Level Routing Attention (arXiv 2303.08810).

The map is split into ``S x S`` regions; region-mean queries and keys give a region affinity,
each region routes to its top-k regions, and its tokens attend to the tokens of those regions
(the block-gather engine, with regions made contiguous). A depthwise conv on V (local
context enhancement, LCE) is added before the output projection.
"""


from __future__ import annotations

import torch

from attnkit._validate import check_qkv
from attnkit.kernels.gather import block_gather_attention


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

