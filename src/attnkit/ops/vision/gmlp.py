"""MAXIM's axis token mixing: a dense layer over the tokens of each block or grid group.

"MAXIM: Multi-Axis MLP for Image Processing", arXiv 2201.02973 (CVPR 2022), §3.1.

The spatial gating units of MAXIM's multi-axis gated MLP mix tokens along one axis: ``block`` mixes the
``b x b`` pixels of each non-overlapping window (local), ``grid`` the ``g x g`` pixels spaced
``(Y/g, X/g)`` apart (global, dilated; MaxViT's grid partition). With ``n = size^2``:
``out[t] = sum_s W[t, s] x[s] + bias[t]`` inside each group, the same ``(n, n)`` weights everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.local.multi_axis import block_partition, block_unpartition, grid_partition, grid_unpartition
from attnkit.ops.vision.common import check_image
from attnkit.reference.naive_vision import naive_axis_token_mixing

AXES = ("block", "grid")


@dataclass(frozen=True, eq=False)
class TokenMixCall:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    size: int
    axis: str

    def describe(self) -> str:
        return f"x {tuple(self.x.shape)} {self.x.dtype}, {self.axis} axis size {self.size}"


def make_token_mix_call(x, weight, bias, size, *, axis: str = "block") -> TokenMixCall:
    fn = "axis_token_mixing"
    x = check_image(fn, "x", x)
    if axis not in AXES:
        raise ValueError(f"{fn}: axis must be one of {AXES}, got {axis!r}")
    try:
        size = int_arg("size", size, 1)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    Y, X = x.shape[1:3]
    if Y % size or X % size:
        raise ValueError(f"{fn}: the map (Y, X) = {(Y, X)} must be a multiple of size {size} on both sides "
                         "(MAXIM pads and crops around the layer)")
    n = size * size
    if not isinstance(weight, torch.Tensor) or weight.shape != (n, n):
        raise ValueError(f"{fn}: weight must be (size^2, size^2) = {(n, n)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (n,)):
        raise ValueError(f"{fn}: bias must be (size^2,) = ({n},) or None")
    return TokenMixCall(x, weight, bias, size, axis)


def _matmul(c: TokenMixCall) -> torch.Tensor:
    Y, X = c.x.shape[1:3]
    part, unpart = (block_partition, block_unpartition) if c.axis == "block" else (grid_partition, grid_unpartition)
    g = part(c.x.unsqueeze(-2), c.size)[..., 0, :]                 # (B*nG, n, C): the tokens of each group
    out = torch.matmul(c.weight.to(g.dtype), g)                     # (B*nG, n, C)
    if c.bias is not None:
        out = out + c.bias.to(g.dtype)[:, None]
    return unpart(out.unsqueeze(-2), c.size, Y, X)[..., 0, :]       # (B, Y, X, C)


def _reference(c: TokenMixCall) -> torch.Tensor:
    return naive_axis_token_mixing(c.x, c.weight, c.bias, c.size, c.axis)


TOKEN_MIX_DISPATCHER = Dispatcher("axis_token_mixing", [
    Backend("matmul", _matmul, note="block / grid partition, one batched (n x n) matmul over the groups",
            detail=lambda c: f"{c.axis} partition"),
    Backend("reference", _reference, auto=False, note="naive_axis_token_mixing: loop over groups"),
])
register_op("axis_token_mixing", lambda x, weight, bias, size=None, **kw: make_token_mix_call(x, weight, bias, size,
                                                                                              **kw),
            TOKEN_MIX_DISPATCHER)


def axis_token_mixing(x, weight, bias, size: int, *, axis: str = "block", backend: str | None = None) -> torch.Tensor:
    """A dense layer over the tokens of each block (local) or grid group (global).

    Args:
        x: ``(B, Y, X, C)``; ``Y, X`` multiples of ``size``.
        weight: ``(n, n)``, ``n = size^2``: ``out[t] = sum_s weight[t, s] x[s]``; bias: ``(n,)`` or None.
        size: block side ``b`` (``axis="block"``) or grid side ``g`` (``axis="grid"``).
        axis: ``"block"`` (pixels of each ``b x b`` window) or ``"grid"`` (the ``g x g`` pixels spaced
            ``(Y/g, X/g)`` apart).
        backend: None / ``"matmul"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, C)``.
    """
    return TOKEN_MIX_DISPATCHER.run(make_token_mix_call(x, weight, bias, size, axis=axis), backend)
