"""MaxViT multi-axis attention: block (window) attention followed by grid (dilated global) attention.

"MaxViT: Multi-Axis Vision Transformer", arXiv 2204.01697 (ECCV 2022). Spec: papers/local.md §3.

Block attention attends inside non-overlapping ``P x P`` windows; grid attention inside groups
formed by a ``G x G`` lattice spread over the image (spacing ``Y/G``). Each uses a learned
per-head relative bias table ``((2M-1)^2, H)``. Identities: block(P) == NA(k=P, s=P) and
grid(G) == NA(k=G, dilation=Y/G) when the bias is zero.
"""


from __future__ import annotations

import torch
import torch.nn.functional as F


def block_partition(x: torch.Tensor, P: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> ``(B * (Y/P)(X/P), P*P, H, D)``: token (y, x) -> window (y div P, x div P)."""
    B, Y, X, H, D = x.shape
    x = x.view(B, Y // P, P, X // P, P, H, D).permute(0, 1, 3, 2, 4, 5, 6)  # (B, Y/P, X/P, P, P, H, D)
    return x.reshape(-1, P * P, H, D)



def block_unpartition(x: torch.Tensor, P: int, Y: int, X: int) -> torch.Tensor:
    H, D = x.shape[-2:]
    x = x.view(-1, Y // P, X // P, P, P, H, D).permute(0, 1, 3, 2, 4, 5, 6)  # (B, Y/P, P, X/P, P, H, D)
    return x.reshape(-1, Y, X, H, D)



def grid_partition(x: torch.Tensor, G: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> ``(B * (Y/G)(X/G), G*G, H, D)``: group (y mod Y/G, x mod X/G), slot (y div Y/G, ...)."""
    B, Y, X, H, D = x.shape
    x = x.view(B, G, Y // G, G, X // G, H, D).permute(0, 2, 4, 1, 3, 5, 6)  # (B, Y/G, X/G, G, G, H, D)
    return x.reshape(-1, G * G, H, D)



def grid_unpartition(x: torch.Tensor, G: int, Y: int, X: int) -> torch.Tensor:
    H, D = x.shape[-2:]
    x = x.view(-1, Y // G, X // G, G, G, H, D).permute(0, 3, 1, 4, 2, 5, 6)  # (B, G, Y/G, G, X/G, H, D)
    return x.reshape(-1, Y, X, H, D)



def relative_bias(table: torch.Tensor, M: int) -> torch.Tensor:
    """``table ((2M-1)^2, H)`` -> ``(H, M*M, M*M)`` bias indexed by in-window offsets."""
    py, px = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    py, px = py.reshape(-1), px.reshape(-1)
    idx = (py[:, None] - py[None, :] + M - 1) * (2 * M - 1) + (px[:, None] - px[None, :] + M - 1)
    return table[idx.to(table.device)].permute(2, 0, 1)  # (H, M*M, M*M)



def _windowed(q, k, v, part, unpart, M, size, bias, scale):
    Y, X = q.shape[1:3]
    qw, kw, vw = (part(t, size).transpose(1, 2) for t in (q, k, v))  # (B*nW, H, M*M, D)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale)
    return unpart(o.transpose(1, 2), size, Y, X)  # (B, Y, X, H, Dv)



def block_attention(q, k, v, block_size: int, *, bias=None, scale=None):
    """MaxViT block attention, heads-last ``(B, Y, X, H, D)`` -> ``(B, Y, X, H, Dv)``; ``bias (H, P*P, P*P)``."""
    Y, X = q.shape[1:3]
    if Y % block_size or X % block_size:
        raise ValueError(f"spatial size ({Y}, {X}) must be a multiple of block_size {block_size}")
    return _windowed(q, k, v, block_partition, block_unpartition, block_size, block_size, bias, scale)



def grid_attention(q, k, v, grid_size: int, *, bias=None, scale=None):
    """MaxViT grid attention, heads-last ``(B, Y, X, H, D)`` -> ``(B, Y, X, H, Dv)``; ``bias (H, G*G, G*G)``."""
    Y, X = q.shape[1:3]
    if Y % grid_size or X % grid_size:
        raise ValueError(f"spatial size ({Y}, {X}) must be a multiple of grid_size {grid_size}")
    return _windowed(q, k, v, grid_partition, grid_unpartition, grid_size, grid_size, bias, scale)

