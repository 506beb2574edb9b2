"""LKA: large-kernel attention, a K x K depthwise field decomposed into three convolutions, used as a gate.

"Visual Attention Network", arXiv 2202.09741 (2022), Sec. 3.1-3.2: ``a = PW(DW_dilated(DW(x)))`` with a
``(2d - 1)``-square depthwise conv, a ``ceil(K / d)``-square depthwise conv of dilation ``d`` and a 1 x 1
conv (VAN: 5 x 5, 7 x 7 dilation 3, K = 21); ``out = x * a`` (no softmax, no sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.channel._common import check_map, check_param
from attnkit.reference.naive_channel import naive_lka_attention


@dataclass(frozen=True, eq=False)
class LkaCall:
    """A validated ``large_kernel_attention`` call."""

    x: torch.Tensor
    dw_weight: torch.Tensor
    dw_bias: torch.Tensor | None
    dil_weight: torch.Tensor
    dil_bias: torch.Tensor | None
    pw_weight: torch.Tensor
    pw_bias: torch.Tensor | None
    dilation: int

    def describe(self) -> str:
        k0, k1 = self.dw_weight.shape[-1], self.dil_weight.shape[-1]
        return f"x {tuple(self.x.shape)} {self.x.dtype}, DW{k0} -> DW{k1} dilation {self.dilation} -> PW"


def _square(op, name, w, C):
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
        raise ValueError(f"{op}: {name} must be a depthwise kernel (C, 1, k, k) with k odd, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    return check_param(op, name, w, (C, 1, w.shape[-1], w.shape[-1]))


def make_call(x, dw_weight, dw_bias, dil_weight, dil_bias, pw_weight, pw_bias, dilation=3) -> LkaCall:
    op = "large_kernel_attention"
    check_map(op, x)
    C = x.shape[1]
    _square(op, "dw_weight", dw_weight, C)
    _square(op, "dil_weight", dil_weight, C)
    check_param(op, "pw_weight", pw_weight, (C, C, 1, 1))
    for name, b in (("dw_bias", dw_bias), ("dil_bias", dil_bias), ("pw_bias", pw_bias)):
        check_param(op, name, b, (C,), optional=True)
    int_arg(f"{op}: dilation", dilation, 1)
    return LkaCall(x, dw_weight, dw_bias, dil_weight, dil_bias, pw_weight, pw_bias, dilation)


def _conv(c: LkaCall) -> torch.Tensor:
    x, C = c.x, c.x.shape[1]
    k0, k1, d = c.dw_weight.shape[-1], c.dil_weight.shape[-1], c.dilation
    a = F.conv2d(x, c.dw_weight, c.dw_bias, padding=k0 // 2, groups=C)
    a = F.conv2d(a, c.dil_weight, c.dil_bias, padding=d * (k1 - 1) // 2, dilation=d, groups=C)
    a = F.conv2d(a, c.pw_weight, c.pw_bias)
    return x * a


DISPATCHER = Dispatcher("large_kernel_attention", [
    Backend("conv", _conv, suits=lambda c: (True, "the fast path"),
            note="three torch convolutions and one multiply", detail=lambda c: f"in {c.x.dtype}"),
    Backend("reference", lambda c: naive_lka_attention(c.x, c.dw_weight, c.dw_bias, c.dil_weight, c.dil_bias,
                                                       c.pw_weight, c.pw_bias, c.dilation), auto=False,
            note="naive_lka_attention: the three convolutions as shifted sums"),
])
register_op("large_kernel_attention", make_call, DISPATCHER)


def large_kernel_attention(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor | None,
                           dil_weight: torch.Tensor, dil_bias: torch.Tensor | None, pw_weight: torch.Tensor,
                           pw_bias: torch.Tensor | None, dilation: int = 3, *, backend: str | None = None
                           ) -> torch.Tensor:
    """VAN's large-kernel attention on a CNN map (zero "same" padding for every conv).

    Args:
        x: ``(B, C, H, W)``.
        dw_weight: ``(C, 1, k0, k0)`` depthwise; dil_weight: ``(C, 1, k1, k1)`` depthwise with ``dilation``;
        pw_weight: ``(C, C, 1, 1)``; the biases ``(C,)`` or None.
        backend: None / ``"conv"`` or ``"reference"``.

    Returns:
        ``(B, C, H, W)``: ``x * PW(DW_dilated(DW(x)))``.

    Example:
        >>> C = 16
        >>> out = large_kernel_attention(torch.randn(1, C, 14, 14), torch.randn(C, 1, 5, 5), None,
        ...                              torch.randn(C, 1, 7, 7), None, torch.randn(C, C, 1, 1), None)
    """
    return DISPATCHER.run(make_call(x, dw_weight, dw_bias, dil_weight, dil_bias, pw_weight, pw_bias, dilation),
                          backend)
