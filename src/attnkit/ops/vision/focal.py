"""Focal modulation: hierarchical depthwise contexts, gated aggregation, a modulator multiplied into the query.

"Focal Modulation Networks", arXiv 2203.11926 (NeurIPS 2022), §3.2 (Eq. 4-7).

From ``z_0 = ctx``: ``z_l = GELU(DWConv_{k_l}(z_{l-1}))`` for ``l = 1..L`` (hierarchical: each level
convolves the previous one), ``z_{L+1} = GELU(mean_{y,x} z_L)``; ``Z = sum_l gates_l * z_l`` (divided by
``L + 1`` when ``normalize``); ``out = q * h(Z)`` with ``h`` a ``C x C`` linear map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.vision.common import check_image
from attnkit.reference.naive_vision import naive_focal_modulation


@dataclass(frozen=True, eq=False)
class FocalCall:
    q: torch.Tensor
    ctx: torch.Tensor
    gates: torch.Tensor
    focal_weights: tuple[torch.Tensor, ...]
    h_weight: torch.Tensor
    h_bias: torch.Tensor | None
    normalize: bool

    def describe(self) -> str:
        ks = ", ".join(str(w.shape[-1]) for w in self.focal_weights)
        return f"q {tuple(self.q.shape)} {self.q.dtype}, {len(self.focal_weights)} levels (kernels {ks}) + global"


def make_focal_call(q, ctx, gates, focal_weights, h_weight, h_bias=None, *, normalize: bool = False) -> FocalCall:
    fn = "focal_modulation"
    q, ctx, gates = (check_image(fn, n, t) for n, t in (("q", q), ("ctx", ctx), ("gates", gates)))
    B, Y, X, C = q.shape
    if ctx.shape != q.shape:
        raise ValueError(f"{fn}: ctx must have q's shape {tuple(q.shape)}, got {tuple(ctx.shape)}")
    weights = tuple(focal_weights)
    if not weights:
        raise ValueError(f"{fn}: focal_weights must hold at least one level's depthwise kernel")
    if gates.shape != (B, Y, X, len(weights) + 1):
        raise ValueError(f"{fn}: gates must be (B, Y, X, L+1) = {(B, Y, X, len(weights) + 1)}, "
                         f"got {tuple(gates.shape)}")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[:2] != (C, 1) or w.shape[2] != w.shape[3] \
                or w.shape[2] % 2 == 0:
            raise ValueError(f"{fn}: focal_weights[{i}] must be a depthwise kernel (C, 1, k, k) with C={C} and odd k, "
                             f"got {tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not isinstance(h_weight, torch.Tensor) or h_weight.shape != (C, C):
        raise ValueError(f"{fn}: h_weight must be (C, C) = {(C, C)}")
    if h_bias is not None and (not isinstance(h_bias, torch.Tensor) or h_bias.shape != (C,)):
        raise ValueError(f"{fn}: h_bias must be (C,) = ({C},) or None")
    for name, t in (("ctx", ctx), ("gates", gates)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    return FocalCall(q, ctx, gates, weights, h_weight, h_bias, bool(normalize))


def _conv(c: FocalCall) -> torch.Tensor:
    # ctx and gates usually arrive as channel slices of one projection: made dense once, because a strided
    # (B, Y, X, 1) gate broadcast over C and a strided depthwise-conv input are several times slower
    z, gates, total = c.ctx.contiguous(), c.gates.contiguous(), None
    for level, w in enumerate(c.focal_weights):
        k = w.shape[-1]
        # (B, Y, X, C) seen as (B, C, Y, X) with channels-last strides: the depthwise conv keeps that format
        z = F.gelu(F.conv2d(z.permute(0, 3, 1, 2), w, padding=k // 2, groups=w.shape[0]).permute(0, 2, 3, 1))
        term = z * gates[..., level:level + 1]
        total = term if total is None else total + term
    glob = F.gelu(z.mean(dim=(1, 2), keepdim=True))  # (B, 1, 1, C): the global level, the same at every pixel
    total = total + glob * gates[..., len(c.focal_weights):]
    if c.normalize:
        total = total / (len(c.focal_weights) + 1)
    return c.q * F.linear(total, c.h_weight, c.h_bias)


def _reference(c: FocalCall) -> torch.Tensor:
    return naive_focal_modulation(c.q, c.ctx, c.gates, c.focal_weights, c.h_weight, c.h_bias, c.normalize)


FOCAL_DISPATCHER = Dispatcher("focal_modulation", [
    Backend("conv", _conv, note="channels-last depthwise conv2d per level, gated sum, linear h",
            detail=lambda c: f"{len(c.focal_weights)} depthwise convs on the channels-last view"),
    Backend("reference", _reference, auto=False, note="naive_focal_modulation: explicit shifts"),
])
register_op("focal_modulation", make_focal_call, FOCAL_DISPATCHER)


def focal_modulation(q, ctx, gates, focal_weights, h_weight, h_bias=None, *, normalize: bool = False,
                     backend: str | None = None) -> torch.Tensor:
    """Focal modulation of ``q`` by the gated hierarchical contexts of ``ctx``.

    Args:
        q: ``(B, Y, X, C)`` the query projection.
        ctx: ``(B, Y, X, C)`` the context projection ``z_0``.
        gates: ``(B, Y, X, L+1)`` raw gate values (no softmax), one per level and the global level.
        focal_weights: ``L`` depthwise kernels ``(C, 1, k_l, k_l)`` (odd ``k_l``, no bias).
        h_weight: ``(C, C)``; h_bias: ``(C,)`` or None: the modulator's linear map.
        normalize: divide the gated sum by ``L + 1`` (FocalNet's ``normalize_modulator``).
        backend: None / ``"conv"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, C)``: ``q * h(sum_l gates_l z_l)``.
    """
    return FOCAL_DISPATCHER.run(make_focal_call(q, ctx, gates, focal_weights, h_weight, h_bias, normalize=normalize),
                                backend)
