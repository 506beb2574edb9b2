"""CCNet criss-cross attention: each pixel attends to its row and its column (centre counted once).

"CCNet: Criss-Cross Attention for Semantic Segmentation", arXiv 1811.11721 (ICCV 2019).
One joint softmax over the ``Y + X - 1`` positions; no logit scaling; ``out = gamma * attn + x``
with ``gamma`` initialised to 0; recurrence ``R`` reuses the same weights (RCCA, ``R = 2`` gives
full reachability).
"""


from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_local import naive_criss_cross_attention


@dataclass(frozen=True, eq=False)
class CrissCrossCall:
    """A validated ``criss_cross_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float

    def describe(self) -> str:
        return f"q {tuple(self.q.shape)} v {tuple(self.v.shape)} {self.q.dtype}, scale {self.scale:.4g}"


def make_call(q, k, v, scale=1.0) -> CrissCrossCall:
    hq, hkv = check_qkv(q, k, v, spatial_rank=2, same_extent=True)
    if hq != hkv:
        raise ValueError(f"criss_cross_attention needs as many K/V heads as query heads, got {hq} and {hkv}")
    return CrissCrossCall(q, k, v, resolve_scale(scale, q.shape[-1]))


def _half(c: CrissCrossCall) -> bool:
    return c.q.dtype in (torch.float16, torch.bfloat16)


def _einsum(c: CrissCrossCall) -> torch.Tensor:
    q, k, v, scale = c.q, c.k, c.v, c.scale
    Y = q.shape[1]
    ct = torch.float32 if _half(c) else q.dtype  # no scaling: softmax in fp32
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    e_col = torch.einsum("byxhd,bzxhd->byxhz", qf, kf) * scale  # (B, Y, X, H, Y): same column, key row z
    e_row = torch.einsum("byxhd,byzhd->byxhz", qf, kf) * scale  # (B, Y, X, H, X): same row, key column z
    self_pos = torch.eye(Y, dtype=torch.bool, device=q.device)[:, None, None, :]  # (Y, 1, 1, Y)
    e_col = e_col.masked_fill(self_pos, float("-inf"))  # the centre is counted in the row branch only
    a = torch.softmax(torch.cat([e_col, e_row], -1), -1)
    out = torch.einsum("byxhz,bzxhd->byxhd", a[..., :Y], vf) + torch.einsum("byxhz,byzhd->byxhd", a[..., Y:], vf)
    return out.to(q.dtype)


DISPATCHER = Dispatcher("criss_cross_attention", [
    Backend("einsum", _einsum, suits=lambda c: (True, "the fast path"),
            note="row and column scores by einsum, one joint softmax",
            detail=lambda c: "fp32 scores for half inputs" if _half(c) else f"scores in {c.q.dtype}"),
    Backend("reference", lambda c: naive_criss_cross_attention(c.q, c.k, c.v, c.scale), auto=False,
            note="naive_criss_cross_attention: pixel by pixel over its row and column"),
])
register_op("criss_cross_attention", make_call, DISPATCHER)


def criss_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *,
                          backend: str | None = None) -> torch.Tensor:
    """Criss-cross attention, heads-last.

    Args:
        q: ``(B, Y, X, H, D)``; k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``.
        scale: logit scale; CCNet uses none (1.0).
        backend: None / ``"einsum"`` (the fast path) or ``"reference"``;
            see ``ak.explain("criss_cross_attention", ...)``.

    Returns:
        ``(B, Y, X, H, Dv)``: for pixel (y, x), softmax over row y and column x (the centre once) of ``v``.

    Example:
        >>> q = k = v = torch.randn(1, 16, 16, 2, 8)
        >>> out = criss_cross_attention(q, k, v)   # (1, 16, 16, 2, 8)
    """
    return DISPATCHER.run(make_call(q, k, v, scale), backend)
