"""SAT's spatial-query attention: a learnable spatial token scores every patch with a sigmoid.

"Spatial-Aware Token for Weakly Supervised Object Localization", arXiv 2303.10438, §3.2: in the last
blocks the spatial token's query meets the patch keys; the head-averaged scores through a sigmoid are
a foreground probability per patch (a sigmoid, not a softmax: patches are independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_cross import naive_spatial_token_map


@dataclass(frozen=True, eq=False)
class MapCall:
    """A validated ``spatial_token_map`` call."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float

    def describe(self) -> str:
        return f"spatial query {tuple(self.q.shape)} over k {tuple(self.k.shape)} {self.q.dtype}"


def make_call(q, k, v=None, *, scale=None) -> MapCall:
    check_qkv(q, k, k)
    if q.shape[1] != 1 or q.shape[2] != k.shape[2]:
        raise ValueError(f"spatial_token_map: q must be one token (B, 1, H, D) with k's heads, got {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    return MapCall(q, k, resolve_scale(scale, q.shape[-1]))


def _einsum(c: MapCall) -> torch.Tensor:
    work = torch.float32 if c.q.dtype in (torch.float16, torch.bfloat16) else c.q.dtype
    s = torch.einsum("bhd,bnhd->bn", c.q[:, 0].to(work), c.k.to(work)) * (c.scale / c.q.shape[2])  # head mean
    return torch.sigmoid(s).to(c.q.dtype)


def _reference(c: MapCall) -> torch.Tensor:
    return naive_spatial_token_map(c.q, c.k, c.scale)


DISPATCHER = Dispatcher("spatial_token_map", [
    Backend("einsum", _einsum, suits=lambda c: (True, "one einsum"), note="head-mean of q . k, sigmoid"),
    Backend("reference", _reference, auto=False, note="naive_spatial_token_map"),
])
register_op("spatial_token_map", make_call, DISPATCHER)


def spatial_token_map(q, k, *, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """``sigmoid(mean_h(q . k_j) * scale)``: the spatial token's foreground probability of every patch.

    Args:
        q: ``(B, 1, H, D)``, the spatial token's query; k: ``(B, N, H, D)``, the patches' keys.
        scale: default ``D ** -0.5``. backend: None, ``"einsum"`` or ``"reference"``.

    Returns:
        ``(B, N)`` in ``(0, 1)``; reshape to ``(B, h, w)`` for the map.

    Example:
        >>> m = spatial_token_map(q[:, :1], k[:, 1:]).view(b, 14, 14)
    """
    return DISPATCHER.run(make_call(q, k, scale=scale), backend)
