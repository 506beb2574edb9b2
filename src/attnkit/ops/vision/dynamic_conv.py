"""OverLoCK's per-pixel dynamic depthwise aggregation (the "mix" step of ContMix).

"OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
arXiv 2502.20087 (CVPR 2025), §3.3.

Every pixel ``p`` owns a ``k x k`` kernel per channel group (predicted from its affinity to region
centres of the context); channel ``c`` of group ``g(c)`` is ``out[p, c] = sum_o K[p, g(c), o] x[p + o, c]``
over the ``k x k`` offsets ``o`` centred on ``p``, zero outside the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.vision.common import check_image
from attnkit.reference.naive_vision import naive_dynamic_depthwise_conv


@dataclass(frozen=True, eq=False)
class DynamicConvCall:
    x: torch.Tensor
    kernels: torch.Tensor
    kernel_size: int

    def describe(self) -> str:
        return (f"x {tuple(self.x.shape)} {self.x.dtype}, {self.kernels.shape[3]} groups, "
                f"per-pixel {self.kernel_size}x{self.kernel_size} kernels")


def make_dynamic_conv_call(x, kernels, kernel_size) -> DynamicConvCall:
    fn = "dynamic_depthwise_conv"
    x = check_image(fn, "x", x)
    kernels = check_image(fn, "kernels", kernels, rank=5, layout="(B, Y, X, G, k*k)")
    try:
        k = int_arg("kernel_size", kernel_size, 1)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    if k % 2 == 0:
        raise ValueError(f"{fn}: kernel_size must be odd (a kernel centred on each pixel), got {k}")
    B, Y, X, C = x.shape
    G = kernels.shape[3]
    if kernels.shape[:3] != x.shape[:3] or kernels.shape[4] != k * k:
        raise ValueError(f"{fn}: kernels must be (B, Y, X, G, k*k) = {(B, Y, X, 'G', k * k)}, got "
                         f"{tuple(kernels.shape)}")
    if C % G:
        raise ValueError(f"{fn}: the channel count C={C} must be divisible by the kernel groups G={G}")
    if kernels.dtype != x.dtype:
        raise TypeError(f"{fn}: kernels must have x's dtype {x.dtype}, got {kernels.dtype}")
    return DynamicConvCall(x, kernels, k)


def _shifts(c: DynamicConvCall) -> torch.Tensor:
    # k^2 shifted slices of one padded copy, each weighted and summed: memory O(Y X C), no unfold of k^2 copies
    B, Y, X, C = c.x.shape
    G, k = c.kernels.shape[3], c.kernel_size
    r = k // 2
    xp = F.pad(c.x, (0, 0, r, r, r, r)).view(B, Y + 2 * r, X + 2 * r, G, C // G)  # (B, Y+2r, X+2r, G, C/G)
    # unbind once: indexing kernels[..., o] k^2 times would allocate a full-size zero gradient per tap in backward
    taps = c.kernels.unsqueeze(-1).unbind(-2)  # k^2 x (B, Y, X, G, 1)
    out = None
    for i in range(k):
        for j in range(k):
            term = xp[:, i:i + Y, j:j + X] * taps[i * k + j]      # (B, Y, X, G, C/G)
            out = term if out is None else out + term
    return out.reshape(B, Y, X, C)


def _reference(c: DynamicConvCall) -> torch.Tensor:
    return naive_dynamic_depthwise_conv(c.x, c.kernels, c.kernel_size)


DYNAMIC_CONV_DISPATCHER = Dispatcher("dynamic_depthwise_conv", [
    Backend("shifts", _shifts, note="k^2 weighted shifted slices of one padded copy",
            detail=lambda c: f"{c.kernel_size ** 2} shifted multiply-adds"),
    Backend("reference", _reference, auto=False, note="naive_dynamic_depthwise_conv"),
])
register_op("dynamic_depthwise_conv", make_dynamic_conv_call, DYNAMIC_CONV_DISPATCHER)


def dynamic_depthwise_conv(x, kernels, kernel_size: int, *, backend: str | None = None) -> torch.Tensor:
    """Per-pixel, per-group depthwise convolution.

    Args:
        x: ``(B, Y, X, C)``.
        kernels: ``(B, Y, X, G, k*k)`` (``C % G == 0``): pixel ``p``'s kernel for group ``g``, row-major offsets.
        kernel_size: odd ``k``.
        backend: None / ``"shifts"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, C)``.
    """
    return DYNAMIC_CONV_DISPATCHER.run(make_dynamic_conv_call(x, kernels, kernel_size), backend)
