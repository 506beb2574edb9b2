"""SDLSKA: BEVANet's sparsely decomposed large-kernel attention (a small square kernel and two parallel dilated
strips), fused by a kernel-selection function and used as a multiplicative gate.

"BEVANet: Bilateral Efficient Visual Attention Network for Real-Time Semantic Segmentation", arXiv 2508.07300
(ICIP 2025), Sec. 3: ``s = DW_{k0 x k0}(x)``, ``h = DW_{1 x k1, dilation r}(s)``, ``v = DW_{k1 x 1, dilation r}(s)``
(both strips read ``s``: a cross-shaped receptive field), ``f = CKS(s, h, v)``, ``out = x * PW(f)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.channel._common import check_map, check_param
from attnkit.reference.naive_vision_a import naive_sdlska_attention

#: nominal kernel K -> (k0, k1, dilation r): the configurations of the authors' code
SDLSKA_KERNELS = {7: (3, 3, 2), 11: (3, 5, 2), 23: (5, 7, 3), 35: (5, 11, 3)}


@dataclass(frozen=True, eq=False)
class SdlskaCall:
    """A validated ``sdlska_attention`` call."""

    x: torch.Tensor
    dw_weight: torch.Tensor
    dw_bias: torch.Tensor | None
    h_weight: torch.Tensor
    h_bias: torch.Tensor | None
    v_weight: torch.Tensor
    v_bias: torch.Tensor | None
    pw_weight: torch.Tensor
    pw_bias: torch.Tensor | None
    dilation: int
    select: Callable | None

    def describe(self) -> str:
        k0, k1 = self.dw_weight.shape[-1], self.h_weight.shape[-1]
        return (f"x {tuple(self.x.shape)} {self.x.dtype}, DW{k0} -> 1x{k1} | {k1}x1 dilation {self.dilation}, "
                f"{'sum' if self.select is None else 'select'} -> PW")


def make_call(x, dw_weight, dw_bias, h_weight, h_bias, v_weight, v_bias, pw_weight, pw_bias, dilation,
              select=None) -> SdlskaCall:
    op = "sdlska_attention"
    check_map(op, x)
    C = x.shape[1]
    k0 = dw_weight.shape[-1] if isinstance(dw_weight, torch.Tensor) and dw_weight.dim() == 4 else 0
    k1 = h_weight.shape[-1] if isinstance(h_weight, torch.Tensor) and h_weight.dim() == 4 else 0
    if k0 % 2 == 0 or k1 % 2 == 0:
        raise ValueError(f"{op}: dw_weight (C, 1, k0, k0) and h_weight (C, 1, 1, k1) need odd k0 and k1 (same "
                         f"padding), got {getattr(dw_weight, 'shape', None)} and {getattr(h_weight, 'shape', None)}")
    check_param(op, "dw_weight", dw_weight, (C, 1, k0, k0))
    check_param(op, "h_weight", h_weight, (C, 1, 1, k1))
    check_param(op, "v_weight", v_weight, (C, 1, k1, 1))
    check_param(op, "pw_weight", pw_weight, (C, C, 1, 1))
    for name, b in (("dw_bias", dw_bias), ("h_bias", h_bias), ("v_bias", v_bias), ("pw_bias", pw_bias)):
        check_param(op, name, b, (C,), optional=True)
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"{op}: dilation must be an int >= 1, got {dilation!r}")
    if select is not None and not callable(select):
        raise TypeError(f"{op}: select must be None or a callable (s, h, v) -> f, got {type(select).__name__}")
    return SdlskaCall(x, dw_weight, dw_bias, h_weight, h_bias, v_weight, v_bias, pw_weight, pw_bias, dilation,
                      select)


def _conv(c: SdlskaCall) -> torch.Tensor:
    x, C, r = c.x, c.x.shape[1], c.dilation
    k0, k1 = c.dw_weight.shape[-1], c.h_weight.shape[-1]
    p = r * (k1 - 1) // 2  # the strips' 'same' padding along their long axis
    s = F.conv2d(x, c.dw_weight, c.dw_bias, padding=k0 // 2, groups=C)
    h = F.conv2d(s, c.h_weight, c.h_bias, padding=(0, p), dilation=r, groups=C)
    v = F.conv2d(s, c.v_weight, c.v_bias, padding=(p, 0), dilation=r, groups=C)
    f = s + h + v if c.select is None else c.select(s, h, v)
    return x * F.conv2d(f, c.pw_weight, c.pw_bias)


DISPATCHER = Dispatcher("sdlska_attention", [
    Backend("conv", _conv, suits=lambda c: (True, "the fast path"),
            note="three depthwise torch convolutions, the selection, a 1x1 conv and one multiply",
            detail=lambda c: f"in {c.x.dtype}"),
    Backend("reference", lambda c: naive_sdlska_attention(c.x, c.dw_weight, c.dw_bias, c.h_weight, c.h_bias,
                                                          c.v_weight, c.v_bias, c.pw_weight, c.pw_bias, c.dilation,
                                                          c.select),
            auto=False, note="naive_sdlska_attention: the convolutions as shifted sums"),
])
register_op("sdlska_attention", make_call, DISPATCHER)


def sdlska_attention(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None, h_weight: torch.Tensor,
                     h_bias: torch.Tensor | None, v_weight: torch.Tensor, v_bias: torch.Tensor | None,
                     pw_weight: torch.Tensor, pw_bias: torch.Tensor | None, dilation: int,
                     select: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None, *,
                     backend: str | None = None) -> torch.Tensor:
    """BEVANet's sparse dilated large-kernel attention on a CNN map (zero 'same' padding for every conv).

    Args:
        x: ``(B, C, H, W)``.
        dw_weight: ``(C, 1, k0, k0)``: the small square depthwise kernel.
        h_weight: ``(C, 1, 1, k1)`` and v_weight ``(C, 1, k1, 1)``: the horizontal and vertical dilated strips,
            both applied to the small conv's output.
        pw_weight: ``(C, C, 1, 1)``; every bias ``(C,)`` or None.
        dilation: ``r`` of both strips.
        select: ``(s, h, v) -> f``, each ``(B, C, H, W)``: the kernel selection (BEVANet's CKS is
            ``attnkit``'s ``ComprehensiveKernelSelection`` module); None: the plain sum ``s + h + v``.
        backend: None / ``"conv"`` or ``"reference"``.

    Returns:
        ``(B, C, H, W)``: ``x * PW(select(s, h, v))``.

    Example:
        >>> C = 8
        >>> out = sdlska_attention(torch.randn(1, C, 9, 9), torch.randn(C, 1, 5, 5), None, torch.randn(C, 1, 1, 11),
        ...                        None, torch.randn(C, 1, 11, 1), None, torch.randn(C, C, 1, 1), None, 3)
    """
    return DISPATCHER.run(make_call(x, dw_weight, dw_bias, h_weight, h_bias, v_weight, v_bias, pw_weight, pw_bias,
                                    dilation, select), backend)
