"""HAT's overlapping cross-attention: non-overlapping query windows attend enlarged, overlapping key windows.

"Activating More Pixels in Image Super-Resolution Transformer" (HAT), arXiv 2205.04437 (CVPR 2023), §3.3.

Query windows are the ``M x M`` tiles of the image; the keys and values of window ``(i, j)`` are the
``Mo x Mo`` patch starting at ``(iM - p, jM - p)``, ``p = (Mo - M) / 2``, with zeros outside the image
(``nn.Unfold`` with kernel ``Mo``, stride ``M``, padding ``p`` in the released code). Those zero keys are
not masked in the paper's code: they get weight ``exp(bias)`` and contribute ``v = 0``;
``mask_padded_keys=True`` skips them instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.local.multi_axis import block_partition, block_unpartition
from attnkit.reference.naive_vision import naive_overlapping_window_attention


@dataclass(frozen=True, eq=False)
class OverlapCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    window_size: int
    overlap_size: int
    bias: torch.Tensor | None
    mask_padded_keys: bool
    scale: float

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} {self.q.dtype}, windows {self.window_size} -> keys {self.overlap_size}, "
                f"{'padded keys masked' if self.mask_padded_keys else 'zero padded keys attended'}")


def make_overlap_call(q, k, v, window_size, overlap_size, *, bias=None, mask_padded_keys=False,
                      scale=None) -> OverlapCall:
    fn = "overlapping_window_attention"
    try:
        hq, hkv = check_qkv(q, k, v, spatial_rank=2, same_extent=True)
        M = int_arg("window_size", window_size, 1)
        Mo = int_arg("overlap_size", overlap_size, 1)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    if hq != hkv:
        raise ValueError(f"{fn}: needs as many K/V heads as query heads, got {hq} and {hkv}")
    if Mo < M or (Mo - M) % 2:
        raise ValueError(f"{fn}: overlap_size must be >= window_size ({M}) with an even difference, got {Mo}")
    Y, X = q.shape[1:3]
    if Y % M or X % M:
        raise ValueError(f"{fn}: the map (Y, X) = {(Y, X)} must be a multiple of window_size {M} on both sides "
                         "(HAT pads the image first)")
    if bias is not None and tuple(bias.shape) != (hq, M * M, Mo * Mo):
        raise ValueError(f"{fn}: bias must be (H, M*M, Mo*Mo) = {(hq, M * M, Mo * Mo)}, got {tuple(bias.shape)}")
    return OverlapCall(q, k, v, M, Mo, bias, bool(mask_padded_keys), resolve_scale(scale, q.shape[-1]))


def key_windows(t: torch.Tensor, M: int, Mo: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> ``(B * nW, Mo*Mo, H, D)``: the zero-padded ``Mo x Mo`` patch of each ``M``-window."""
    H, D = t.shape[-2:]
    p = (Mo - M) // 2
    tp = F.pad(t, (0, 0, 0, 0, p, p, p, p))                         # (B, Y+2p, X+2p, H, D)
    w = tp.unfold(1, Mo, M).unfold(2, Mo, M)                         # (B, Y/M, X/M, H, D, Mo, Mo), a view
    return w.permute(0, 1, 2, 5, 6, 3, 4).reshape(-1, Mo * Mo, H, D)  # (B*nW, Mo*Mo, H, D)


def _sdpa(c: OverlapCall) -> torch.Tensor:
    B, Y, X, H = c.q.shape[:4]
    M, Mo = c.window_size, c.overlap_size
    qw = block_partition(c.q, M).transpose(1, 2)                     # (B*nW, H, M*M, D)
    kw, vw = (key_windows(t, M, Mo).transpose(1, 2) for t in (c.k, c.v))  # (B*nW, H, Mo*Mo, D)
    # 4-D: CPU SDPA takes its flash kernel for a 4-D float mask but the math path for a 3-D one
    mask = None if c.bias is None else c.bias.to(c.q.dtype).unsqueeze(0)  # (1, H, M*M, Mo*Mo)
    if c.mask_padded_keys and Mo > M:
        inside = torch.ones(1, Y, X, 1, 1, dtype=c.q.dtype, device=c.q.device)
        keep = key_windows(inside, M, Mo)[..., 0, 0] > 0             # (nW, Mo*Mo): key inside the image
        nw = keep.shape[0]
        neg = torch.zeros(keep.shape, dtype=c.q.dtype, device=c.q.device).masked_fill(~keep, float("-inf"))
        neg = neg.view(1, nw, 1, 1, Mo * Mo)
        mask = neg if mask is None else mask.view(1, 1, H, M * M, Mo * Mo) + neg
        # windows join the heads, so the per-window mask is shared by the batch instead of copied B times
        mask = mask.expand(1, nw, H, M * M, Mo * Mo).reshape(1, nw * H, M * M, Mo * Mo)
        qw, kw, vw = (t.reshape(B, nw * H, *t.shape[2:]) for t in (qw, kw, vw))  # (B, nW*H, *, D)
        o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=c.scale)
        return block_unpartition(o.reshape(B * nw, H, *o.shape[2:]).transpose(1, 2), M, Y, X)  # (B, Y, X, H, Dv)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=c.scale)
    return block_unpartition(o.transpose(1, 2), M, Y, X)             # (B, Y, X, H, Dv)


def _reference(c: OverlapCall) -> torch.Tensor:
    return naive_overlapping_window_attention(c.q, c.k, c.v, c.window_size, c.overlap_size, c.bias,
                                              c.mask_padded_keys, c.scale)


OVERLAP_DISPATCHER = Dispatcher("overlapping_window_attention", [
    Backend("sdpa", _sdpa, note="query windows by partition, key windows by a strided unfold view, one SDPA",
            detail=lambda c: "padded keys masked with -inf" if c.mask_padded_keys else "zero padded keys attended"),
    Backend("reference", _reference, auto=False, note="naive_overlapping_window_attention: loop over windows"),
])
register_op("overlapping_window_attention", make_overlap_call, OVERLAP_DISPATCHER)


def overlapping_window_attention(q, k, v, window_size: int, overlap_size: int, *, bias=None,
                                 mask_padded_keys: bool = False, scale: float | None = None,
                                 backend: str | None = None) -> torch.Tensor:
    """HAT's OCA: each ``M x M`` query window attends the ``Mo x Mo`` key window centred on it.

    Args:
        q, k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``; ``Y, X`` multiples of ``M``.
        window_size: ``M``; overlap_size: ``Mo = M + floor(ratio * M)`` (HAT: ``M = 16``, ratio 0.5, ``Mo = 24``).
        bias: ``(H, M*M, Mo*Mo)`` additive relative bias, or None.
        mask_padded_keys: skip the zero keys outside the image (the paper's code attends them).
        scale: default ``D ** -0.5``.
        backend: None / ``"sdpa"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, H, Dv)``.
    """
    call = make_overlap_call(q, k, v, window_size, overlap_size, bias=bias, mask_padded_keys=mask_padded_keys,
                             scale=scale)
    return OVERLAP_DISPATCHER.run(call, backend)
