"""Pooling ops: spatial pyramid pooling and slot attention's competitive attention step.

"Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition", arXiv 1406.4729 (ECCV 2014),
Sec. 2.3: max-pool the map into ``n x n`` bins for each pyramid level and concatenate (a fixed-length vector for
any input size); bins use adaptive-pooling boundaries ``[floor(i H / n), ceil((i + 1) H / n))``.

"Object-Centric Learning with Slot Attention", arXiv 2006.15055 (NeurIPS 2020), Alg. 1 (as used by Slot-MLLM,
arXiv 2505.17726): the softmax runs over the SLOTS (slots compete for each input), then each slot takes the
attention-weighted mean of the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_sampling import naive_slot_attention_step, naive_spatial_pyramid_pool

MODES = ("max", "avg")


@dataclass(frozen=True, eq=False)
class SppCall:
    """A validated ``spatial_pyramid_pool`` call."""

    x: torch.Tensor
    levels: tuple[int, ...]
    mode: str

    def describe(self) -> str:
        return f"x {tuple(self.x.shape)} {self.x.dtype}, levels {self.levels}, {self.mode}"


def make_spp_call(x, levels=(4, 2, 1), mode="max") -> SppCall:
    op = "spatial_pyramid_pool"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor (B, C, H, W), got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"{op}: x must be a non-empty (B, C, H, W), got shape {tuple(x.shape)}")
    try:
        lv = tuple(int(n) for n in levels)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: levels must be a sequence of ints, got {levels!r}") from None
    if not lv or any(n < 1 for n in lv):
        raise ValueError(f"{op}: levels must be positive bin counts, got {levels!r}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    return SppCall(x, lv, mode)


def _adaptive(c: SppCall) -> torch.Tensor:
    pool = F.adaptive_max_pool2d if c.mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(c.x, n).flatten(1) for n in c.levels], 1)  # (B, C sum n^2): level, channel, row, col


SPP_DISPATCHER = Dispatcher("spatial_pyramid_pool", [
    Backend("adaptive", _adaptive, suits=lambda c: (True, "the fast path"),
            note="one torch adaptive pooling per level, concatenated"),
    Backend("reference", lambda c: naive_spatial_pyramid_pool(c.x, c.levels, c.mode), auto=False,
            note="naive_spatial_pyramid_pool: bin by bin"),
])
register_op("spatial_pyramid_pool", lambda x, levels=(4, 2, 1), mode="max", *_: make_spp_call(x, levels, mode),
            SPP_DISPATCHER)


def spatial_pyramid_pool(x: torch.Tensor, levels: Sequence[int] = (4, 2, 1), mode: str = "max", *,
                         backend: str | None = None) -> torch.Tensor:
    """Spatial pyramid pooling of a CNN map into a fixed-length vector.

    Args:
        x: ``(B, C, H, W)``; any ``H, W`` (bins reuse pixels where ``H`` or ``W`` is below ``n``).
        levels: bins per side of each level (the paper's ZF-5 uses ``(6, 3, 2, 1)``; ``(4, 2, 1)`` is common).
        mode: ``"max"`` (the paper) or ``"avg"``.
        backend: None / ``"adaptive"`` or ``"reference"``.

    Returns:
        ``(B, C * sum(n^2))``, ordered level by level, then channel, row, column.

    Example:
        >>> spatial_pyramid_pool(torch.randn(2, 8, 13, 9)).shape
        torch.Size([2, 168])
    """
    return SPP_DISPATCHER.run(make_spp_call(x, levels, mode), backend)


@dataclass(frozen=True, eq=False)
class SlotCall:
    """A validated ``slot_attention_step`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    eps: float

    def describe(self) -> str:
        return f"slots {tuple(self.q.shape)}, inputs {tuple(self.k.shape)} {self.q.dtype}"


def make_slot_call(q, k, v, scale=None, eps=1e-8) -> SlotCall:
    op = "slot_attention_step"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 3 or t.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty 3-D tensor, got shape {tuple(t.shape)}")
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q must be (B, K, D), k (B, N, D) and v (B, N, Dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return SlotCall(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale), float(eps))


def _slot_fast(c: SlotCall) -> torch.Tensor:
    logits = torch.matmul(c.k, c.q.transpose(1, 2)) * c.scale  # (B, N, K)
    attn = logits.softmax(-1) + c.eps  # over the slots: they compete for each input
    attn = attn / attn.sum(1, keepdim=True)  # (B, N, K): per-slot weighted-mean weights
    return torch.matmul(attn.transpose(1, 2), c.v)  # (B, K, Dv)


SLOT_DISPATCHER = Dispatcher("slot_attention_step", [
    Backend("matmul", _slot_fast, suits=lambda c: (True, "the fast path"), note="two batched matmuls"),
    Backend("reference", lambda c: naive_slot_attention_step(c.q, c.k, c.v, c.scale, c.eps), auto=False,
            note="naive_slot_attention_step: slot by slot"),
])
register_op("slot_attention_step", make_slot_call, SLOT_DISPATCHER)


def slot_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        eps: float = 1e-8, *, backend: str | None = None) -> torch.Tensor:
    """One slot-attention read: softmax over slots, then a per-slot weighted mean of the values.

    Args:
        q: slot queries ``(B, K, D)``; k: input keys ``(B, N, D)``; v: input values ``(B, N, Dv)``.
        scale: logit scale (default ``D ** -0.5``). eps: added to the attention before the per-slot
            normalisation (arXiv 2006.15055, Alg. 1).
        backend: None / ``"matmul"`` or ``"reference"``.

    Returns:
        ``(B, K, Dv)``: ``W^T v`` with ``A = softmax_K(k q^T scale) + eps`` and ``W = A / sum_N A``.
    """
    return SLOT_DISPATCHER.run(make_slot_call(q, k, v, scale, eps), backend)
