"""HaloNet: blocked local self-attention with haloes.

"Scaling Local Self-Attention for Parameter Efficient Visual Backbones", arXiv 2103.12731
(CVPR 2021).

The map is cut into ``b x b`` query blocks; each block attends to its ``(b + 2h)^2`` haloed
window (zero-padded at the image border), with content-dependent relative embeddings
``q . rH[dy] + q . rW[dx]`` (shared across heads). Interior blocks equal GNA(k = b + 2h, s = b).
"""


from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_local import naive_halo_attention


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



@dataclass(frozen=True, eq=False)
class HaloCall:
    """A validated ``halo_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_size: int
    halo_size: int
    rel_h: torch.Tensor | None
    rel_w: torch.Tensor | None
    mask_padding: bool
    scale: float

    def describe(self) -> str:
        rel = "relative terms" if self.rel_h is not None else "no relative terms"
        return (f"q {tuple(self.q.shape)} v {tuple(self.v.shape)} {self.q.dtype}, block {self.block_size}, "
                f"halo {self.halo_size}, {rel}, padding {'masked' if self.mask_padding else 'zero keys'}")


def make_call(q, k, v, block_size, halo_size, *, rel_h=None, rel_w=None, mask_padding=True, scale=None) -> HaloCall:
    hq, hkv = check_qkv(q, k, v, spatial_rank=2, same_extent=True)
    if hq != hkv:
        raise ValueError(f"halo_attention needs as many K/V heads as query heads, got {hq} and {hkv}")
    b = int_arg("block_size", block_size, 1)
    h = int_arg("halo_size", halo_size, 0)
    Y, X = q.shape[1:3]
    if Y % b or X % b:
        raise ValueError(f"spatial size ({Y}, {X}) must be a multiple of block_size {b}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w go together: give both or neither")
    rows = 2 * (b + h) - 1
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if t is not None and tuple(t.shape) != (rows, q.shape[-1]):
            raise ValueError(f"{name} must have shape (2(b+h)-1, D) = ({rows}, {q.shape[-1]}), got {tuple(t.shape)}")
    return HaloCall(q, k, v, b, h, rel_h, rel_w, bool(mask_padding), resolve_scale(scale, q.shape[-1]))


def _unfold(c: HaloCall) -> torch.Tensor:
    q, k, v, b, h, scale = c.q, c.k, c.v, c.block_size, c.halo_size, c.scale
    B, Y, X, H, _ = q.shape
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qb = _blocks(q, b).to(ct)  # (B*nBlk, b*b, H, D)
    kw, vw = _windows(k, b, h).to(ct), _windows(v, b, h).to(ct)  # (B*nBlk, W*W, H, D|Dv)
    s = torch.einsum("nqhd,nkhd->nhqk", qb, kw) * scale  # (B*nBlk, H, b*b, W*W)
    if c.rel_h is not None:
        dy, dx = _rel_index(b, h, q.device)
        rh = torch.einsum("nqhd,rd->nhqr", qb, c.rel_h.to(ct))  # (B*nBlk, H, b*b, 2(b+h)-1)
        rw = torch.einsum("nqhd,rd->nhqr", qb, c.rel_w.to(ct))
        idx = dy.expand(*rh.shape[:2], -1, -1)
        s = s + rh.gather(-1, idx) + rw.gather(-1, dx.expand(*rw.shape[:2], -1, -1))
    if c.mask_padding and h > 0:
        ones = torch.ones(1, Y, X, 1, 1, dtype=torch.bool, device=q.device)
        valid = _windows(ones, b, h)[..., 0, 0]  # (nBlk, W*W): inside the image
        s = s.masked_fill(~valid[:, None, None, :].repeat(B, 1, 1, 1), float("-inf"))
    out = torch.einsum("nhqk,nkhd->nqhd", torch.softmax(s, -1), vw)  # (B*nBlk, b*b, H, Dv)
    out = out.view(B, Y // b, X // b, b, b, H, -1).permute(0, 1, 3, 2, 4, 5, 6)  # (B, Y/b, b, X/b, b, H, Dv)
    return out.reshape(B, Y, X, H, -1).to(q.dtype)


def _reference(c: HaloCall) -> torch.Tensor:
    return naive_halo_attention(c.q, c.k, c.v, c.block_size, c.halo_size, c.rel_h, c.rel_w, c.mask_padding, c.scale)


DISPATCHER = Dispatcher("halo_attention", [
    Backend("unfold", _unfold, suits=lambda c: (True, "the fast path"),
            note="haloed windows by unfold, scores per block with einsum",
            detail=lambda c: "fp32 scores for half inputs" if c.q.dtype in (torch.float16, torch.bfloat16)
            else f"scores in {c.q.dtype}"),
    Backend("reference", _reference, auto=False, note="naive_halo_attention: pixel by pixel over its window"),
])
register_op("halo_attention", make_call, DISPATCHER)


def halo_attention(q, k, v, block_size: int, halo_size: int, *, rel_h=None, rel_w=None, mask_padding: bool = True,
                   scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Blocked local attention with haloes (HaloNet).

    Args:
        q: ``(B, Y, X, H, D)``; k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``; ``Y, X`` multiples of ``block_size``.
        block_size, halo_size: ``b`` and ``h``; each block attends to its ``(b + 2h)^2`` window.
        rel_h, rel_w: ``(2(b+h) - 1, D)`` relative embeddings (row, column), or None.
        mask_padding: True masks window positions outside the image; False keeps them as zero
            keys/values (timm's convention, for weight porting).
        scale: content-logit scale, default ``D ** -0.5`` (the position terms are not scaled, as timm).
        backend: None / ``"unfold"`` (the fast path) or ``"reference"``; see ``ak.explain("halo_attention", ...)``.

    Returns:
        ``(B, Y, X, H, Dv)``.

    Example:
        >>> out = halo_attention(q, k, v, 8, 3)   # 14 x 14 memory per 8 x 8 block
    """
    call = make_call(q, k, v, block_size, halo_size, rel_h=rel_h, rel_w=rel_w, mask_padding=mask_padding,
                     scale=scale)
    return DISPATCHER.run(call, backend)
