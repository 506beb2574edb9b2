"""HaloNet: blocked local self-attention with haloes.

"Scaling Local Self-Attention for Parameter Efficient Visual Backbones", arXiv 2103.12731
(CVPR 2021). Spec: papers/local.md §2.

The map is cut into ``b x b`` query blocks; each block attends to its ``(b + 2h)^2`` haloed
window (zero-padded at the image border), with content-dependent relative embeddings
``q . rH[dy] + q . rW[dx]`` (shared across heads). Interior blocks equal GNA(k = b + 2h, s = b).
"""


from __future__ import annotations

import torch
import torch.nn.functional as F


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> ``(B * nBlk, b*b, H, D)`` non-overlapping blocks, batch-major."""
    B, Y, X, H, D = x.shape
    x = x.view(B, Y // b, b, X // b, b, H, D).permute(0, 1, 3, 2, 4, 5, 6)  # (B, Y/b, X/b, b, b, H, D)
    return x.reshape(B * (Y // b) * (X // b), b * b, H, D)



def _windows(x: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> ``(B * nBlk, W*W, H, D)`` haloed windows (W = b + 2h), zero padding."""
    B, Y, X, H, D = x.shape
    W = b + 2 * h
    xp = F.pad(x, (0, 0, 0, 0, h, h, h, h))  # (B, Y+2h, X+2h, H, D)
    w = xp.unfold(1, W, b).unfold(2, W, b)  # (B, Y/b, X/b, H, D, W, W)
    return w.permute(0, 1, 2, 5, 6, 3, 4).reshape(B * (Y // b) * (X // b), W * W, H, D)



def _rel_index(b: int, h: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows for the y and x offsets of every (query slot, window slot): ``(b*b, W*W)`` each."""
    W = b + 2 * h
    qy, qx = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(W) - h, torch.arange(W) - h, indexing="ij")
    dy = ky.reshape(1, -1) - qy.reshape(-1, 1) + (b + h - 1)  # true offset key - query, shifted to >= 0
    dx = kx.reshape(1, -1) - qx.reshape(-1, 1) + (b + h - 1)
    return dy.to(device), dx.to(device)



def halo_attention(q, k, v, block_size: int, halo_size: int, *, rel_h=None, rel_w=None, mask_padding: bool = True,
                   scale: float | None = None) -> torch.Tensor:
    """Blocked local attention with haloes (HaloNet).

    Args:
        q: ``(B, Y, X, H, D)``; k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``; ``Y, X`` multiples of ``block_size``.
        block_size, halo_size: ``b`` and ``h``; each block attends to its ``(b + 2h)^2`` window.
        rel_h, rel_w: ``(2(b+h) - 1, D)`` relative embeddings (row, column), or None.
        mask_padding: True masks window positions outside the image; False keeps them as zero
            keys/values (timm's convention, for weight porting).
        scale: content-logit scale, default ``D ** -0.5`` (the position terms are not scaled, as timm).

    Returns:
        ``(B, Y, X, H, Dv)``.

    Example:
        >>> out = halo_attention(q, k, v, 8, 3)   # 14 x 14 memory per 8 x 8 block
    """
    B, Y, X, H, D = q.shape
    b, h = block_size, halo_size
    if Y % b or X % b:
        raise ValueError(f"spatial size ({Y}, {X}) must be a multiple of block_size {b}")
    if h < 0:
        raise ValueError(f"halo_size must be >= 0, got {h}")
    scale = D ** -0.5 if scale is None else scale
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qb = _blocks(q, b).to(ct)  # (B*nBlk, b*b, H, D)
    kw, vw = _windows(k, b, h).to(ct), _windows(v, b, h).to(ct)  # (B*nBlk, W*W, H, D|Dv)
    s = torch.einsum("nqhd,nkhd->nhqk", qb, kw) * scale  # (B*nBlk, H, b*b, W*W)
    if rel_h is not None:
        dy, dx = _rel_index(b, h, q.device)
        rh = torch.einsum("nqhd,rd->nhqr", qb, rel_h.to(ct))  # (B*nBlk, H, b*b, 2(b+h)-1)
        rw = torch.einsum("nqhd,rd->nhqr", qb, rel_w.to(ct))
        idx = dy.expand(*rh.shape[:2], -1, -1)
        s = s + rh.gather(-1, idx) + rw.gather(-1, dx.expand(*rw.shape[:2], -1, -1))
    if mask_padding and h > 0:
        ones = torch.ones(1, Y, X, 1, 1, dtype=torch.bool, device=q.device)
        valid = _windows(ones, b, h)[..., 0, 0]  # (nBlk, W*W): inside the image
        s = s.masked_fill(~valid[:, None, None, :].repeat(B, 1, 1, 1), float("-inf"))
    out = torch.einsum("nhqk,nkhd->nqhd", torch.softmax(s, -1), vw)  # (B*nBlk, b*b, H, Dv)
    out = out.view(B, Y // b, X // b, b, b, H, -1).permute(0, 1, 3, 2, 4, 5, 6)  # (B, Y/b, b, X/b, b, H, Dv)
    return out.reshape(B, Y, X, H, -1).to(q.dtype)

