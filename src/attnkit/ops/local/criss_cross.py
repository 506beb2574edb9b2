"""CCNet criss-cross attention: each pixel attends to its row and its column (centre counted once).

"CCNet: Criss-Cross Attention for Semantic Segmentation", arXiv 1811.11721 (ICCV 2019).
Spec: papers/local.md §4. One joint softmax over the ``Y + X - 1`` positions; no logit
scaling; ``out = gamma * attn + x`` with ``gamma`` initialised to 0; recurrence ``R`` reuses
the same weights (RCCA, ``R = 2`` gives full reachability).
"""


from __future__ import annotations

import torch


def criss_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Criss-cross attention, heads-last.

    Args:
        q: ``(B, Y, X, H, D)``; k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``.
        scale: logit scale; CCNet uses none (1.0).

    Returns:
        ``(B, Y, X, H, Dv)``: for pixel (y, x), softmax over row y and column x (the centre once) of ``v``.

    Example:
        >>> out = criss_cross_attention(q, k, v)
    """
    Y = q.shape[1]
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # no scaling: softmax in fp32
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    e_col = torch.einsum("byxhd,bzxhd->byxhz", qf, kf) * scale  # (B, Y, X, H, Y): same column, key row z
    e_row = torch.einsum("byxhd,byzhd->byxhz", qf, kf) * scale  # (B, Y, X, H, X): same row, key column z
    self_pos = torch.eye(Y, dtype=torch.bool, device=q.device)[:, None, None, :]  # (Y, 1, 1, Y)
    e_col = e_col.masked_fill(self_pos, float("-inf"))  # the centre is counted in the row branch only
    a = torch.softmax(torch.cat([e_col, e_row], -1), -1)
    out = torch.einsum("byxhz,bzxhd->byxhd", a[..., :Y], vf) + torch.einsum("byxhz,byzhd->byxhd", a[..., Y:], vf)
    return out.to(q.dtype)

