"""PoolFormer's pooling token mixer: average pooling minus the identity.

"MetaFormer Is Actually What You Need for Vision", arXiv 2111.11418 (CVPR 2022), §3.2.

``pool_mixer(x) = AvgPool_{k x k, stride 1, same}(x) - x`` where the average counts only pixels inside
the image (``count_include_pad=False``), so a constant image maps to exactly zero, borders included.
The block adds ``x`` back through its residual; that is why the mixer subtracts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.vision.common import check_image
from attnkit.reference.naive_vision import naive_pool_mixer


@dataclass(frozen=True, eq=False)
class PoolCall:
    x: torch.Tensor
    pool_size: int

    def describe(self) -> str:
        return f"x {tuple(self.x.shape)} {self.x.dtype}, pool {self.pool_size}x{self.pool_size}"


def make_pool_call(x, pool_size: int = 3) -> PoolCall:
    x = check_image("pool_mixer", "x", x)
    try:
        pool_size = int_arg("pool_size", pool_size, 1)
    except (TypeError, ValueError) as e:
        raise type(e)(f"pool_mixer: {e}") from None
    if pool_size % 2 == 0:
        raise ValueError(f"pool_mixer: pool_size must be odd (a 'same' window centred on each pixel), got {pool_size}")
    return PoolCall(x, pool_size)


def _avg_pool(c: PoolCall) -> torch.Tensor:
    # (B, Y, X, C) viewed as (B, C, Y, X) with channels-last strides: avg_pool2d runs in that memory format,
    # so no copy is made on the way in or out
    xc = c.x.permute(0, 3, 1, 2)
    k = c.pool_size
    y = F.avg_pool2d(xc, k, stride=1, padding=k // 2, count_include_pad=False)
    return y.permute(0, 2, 3, 1) - c.x


def _reference(c: PoolCall) -> torch.Tensor:
    return naive_pool_mixer(c.x, c.pool_size)


POOL_DISPATCHER = Dispatcher("pool_mixer", [
    Backend("avg_pool", _avg_pool, note="F.avg_pool2d on the channels-last view, minus x",
            detail=lambda c: "channels-last avg_pool2d, count_include_pad=False"),
    Backend("reference", _reference, auto=False, note="naive_pool_mixer: explicit shifts and in-image counts"),
])
register_op("pool_mixer", lambda x, *_, **kw: make_pool_call(x, **kw), POOL_DISPATCHER)


def pool_mixer(x: torch.Tensor, pool_size: int = 3, *, backend: str | None = None) -> torch.Tensor:
    """PoolFormer's token mixer on a channels-last image.

    Args:
        x: ``(B, Y, X, C)``.
        pool_size: odd window ``k`` (3 in the paper); the window is clipped at the borders and the mean
            divides by the pixels inside the image.
        backend: None / ``"avg_pool"`` or ``"reference"``; see ``ak.explain("pool_mixer", x, None, None)``.

    Returns:
        ``(B, Y, X, C)``: ``mean_window(x) - x``.

    Example:
        >>> y = pool_mixer(torch.randn(2, 56, 56, 64))
    """
    return POOL_DISPATCHER.run(make_pool_call(x, pool_size), backend)
