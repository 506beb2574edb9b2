"""ECA: a channel gate from a 1-D convolution over the pooled channel descriptor.

"ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", arXiv 1910.03151 (CVPR 2020),
Sec. 3.2-3.3: ``y = GAP(x)`` per channel, ``z = conv1d(y, w)`` along the channel axis (zero padded, kernel
``k`` odd, no bias), ``out = x * sigmoid(z)``. The adaptive kernel size is :func:`eca_kernel_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.channel._common import check_map, check_param, work_dtype
from attnkit.reference.naive_channel import naive_eca_attention


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0, minimum: int = 1) -> int:
    """ECA's adaptive kernel size (arXiv 1910.03151, Eq. 12): the odd integer nearest ``log2(C)/gamma + b/gamma``
    (ties upward, as the authors' code: ``t = int(|log2(C) + b| / gamma)``, ``t + 1`` if even), at least ``minimum``."""
    t = int(abs(math.log2(channels) + b) / gamma)
    return max(t if t % 2 else t + 1, minimum)


@dataclass(frozen=True, eq=False)
class EcaCall:
    """A validated ``eca_attention`` call."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def describe(self) -> str:
        return f"x {tuple(self.x.shape)} {self.x.dtype}, k={self.weight.shape[0]}, bias={self.bias is not None}"


def make_call(x, weight, bias=None) -> EcaCall:
    check_map("eca_attention", x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"eca_attention: weight must be a 1-D kernel (k,), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    check_param("eca_attention", "weight", weight, tuple(weight.shape))
    if weight.shape[0] % 2 == 0:
        raise ValueError(f"eca_attention: the kernel size must be odd (same padding), got k={weight.shape[0]}")
    check_param("eca_attention", "bias", bias, (1,), optional=True)
    return EcaCall(x, weight, bias)


def _conv(c: EcaCall) -> torch.Tensor:
    x = c.x
    B, C = x.shape[:2]
    wt = work_dtype(x)
    k = c.weight.shape[0]
    y = x.mean((2, 3)) if wt == x.dtype else x.mean((2, 3), dtype=wt)  # the plain kernel when no upcast is needed
    y = y.view(B, 1, C)  # (B, 1, C): channels are the conv's length axis
    bias = None if c.bias is None else c.bias.to(wt)
    z = F.conv1d(y, c.weight.to(wt).view(1, 1, k), bias, padding=(k - 1) // 2)  # (B, 1, C)
    gate = torch.sigmoid(z).to(x.dtype).view(B, C, 1, 1)  # (B, C, 1, 1)
    return x * gate


DISPATCHER = Dispatcher("eca_attention", [
    Backend("conv", _conv, suits=lambda c: (True, "the fast path"),
            note="mean over H, W; conv1d over channels; sigmoid; one broadcast multiply",
            detail=lambda c: "pooled and gated in float32" if work_dtype(c.x) != c.x.dtype else f"in {c.x.dtype}"),
    Backend("reference", lambda c: naive_eca_attention(c.x, c.weight, c.bias), auto=False,
            note="naive_eca_attention: the banded channel sum written out"),
])
register_op("eca_attention", make_call, DISPATCHER)


def eca_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """Efficient Channel Attention on a CNN map.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(k,)``, ``k`` odd: the 1-D kernel slid along the channel axis (zero padded at both ends).
        bias: optional ``(1,)`` (the paper has none).
        backend: None / ``"conv"`` (the fast path) or ``"reference"``; see ``ak.explain("eca_attention", ...)``.

    Returns:
        ``(B, C, H, W)``: ``x * sigmoid(conv1d(mean_{H,W} x, weight))``.

    Example:
        >>> out = eca_attention(torch.randn(2, 64, 8, 8), torch.randn(3))   # (2, 64, 8, 8)
    """
    return DISPATCHER.run(make_call(x, weight, bias), backend)
