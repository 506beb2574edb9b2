"""MAXIM's multi-axis spatial gating weights: the token mixing inside the cross-gating block.

"MAXIM: Multi-Axis MLP for Image Processing", arXiv 2201.02973 (CVPR 2022), §3.2.

``u (B, Y, X, 2C)`` (after the block's LayerNorm, Dense(C, 2C) and GELU) is split in two channel halves: the
first is mixed by a dense layer over the ``g x g`` tokens of each grid group (pixels spaced ``(Y/g, X/g)``
apart, global), the second over the ``b x b`` tokens of each block (local); the two are concatenated back to
``2C`` channels. Unlike the gMLP of the multi-axis block there is no multiplicative split inside: the result
gates the *other* stream of the cross-gating block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.vision.common import check_image
from attnkit.ops.vision.gmlp import axis_token_mixing
from attnkit.reference.naive_vision_b import naive_multi_axis_spatial_weights


@dataclass(frozen=True, eq=False)
class SpatialWeightsCall:
    u: torch.Tensor
    grid_weight: torch.Tensor
    grid_bias: torch.Tensor | None
    grid_size: int
    block_weight: torch.Tensor
    block_bias: torch.Tensor | None
    block_size: int

    def describe(self) -> str:
        return f"u {tuple(self.u.shape)} {self.u.dtype}, grid {self.grid_size}, block {self.block_size}"


def make_spatial_weights_call(u, grid_weight, grid_bias, grid_size, block_weight, block_bias,
                              block_size) -> SpatialWeightsCall:
    fn = "multi_axis_spatial_weights"
    u = check_image(fn, "u", u)
    if u.shape[-1] % 2:
        raise ValueError(f"{fn}: u must have an even channel count (grid half, block half), got {u.shape[-1]}")
    return SpatialWeightsCall(u, grid_weight, grid_bias, grid_size, block_weight, block_bias, block_size)


def _matmul(c: SpatialWeightsCall) -> torch.Tensor:
    grid_half, block_half = c.u.chunk(2, dim=-1)                                       # each (B, Y, X, C)
    grid = axis_token_mixing(grid_half, c.grid_weight, c.grid_bias, c.grid_size, axis="grid")
    block = axis_token_mixing(block_half, c.block_weight, c.block_bias, c.block_size, axis="block")
    return torch.cat([grid, block], dim=-1)                                            # (B, Y, X, 2C)


def _reference(c: SpatialWeightsCall) -> torch.Tensor:
    return naive_multi_axis_spatial_weights(c.u, c.grid_weight, c.grid_bias, c.grid_size, c.block_weight,
                                            c.block_bias, c.block_size)


SPATIAL_WEIGHTS_DISPATCHER = Dispatcher("multi_axis_spatial_weights", [
    Backend("matmul", _matmul, note="axis_token_mixing on each half (grid, block), concatenated"),
    Backend("reference", _reference, auto=False, note="naive_multi_axis_spatial_weights: loop over groups"),
])
register_op("multi_axis_spatial_weights", make_spatial_weights_call, SPATIAL_WEIGHTS_DISPATCHER)


def multi_axis_spatial_weights(u, grid_weight, grid_bias, grid_size: int, block_weight, block_bias, block_size: int,
                               *, backend: str | None = None) -> torch.Tensor:
    """MAXIM cross-gating's spatial weights: grid mixing on the first channel half, block mixing on the second.

    Args:
        u: ``(B, Y, X, 2C)``; ``Y, X`` multiples of ``grid_size`` and ``block_size``.
        grid_weight: ``(g^2, g^2)``, grid_bias ``(g^2,)`` or None: the dense layer over each grid group's tokens.
        block_weight: ``(b^2, b^2)``, block_bias ``(b^2,)`` or None: the dense layer over each block's tokens.
        grid_size: ``g``; block_size: ``b``.
        backend: None / ``"matmul"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, 2C)``: ``concat(grid_mix(u[..., :C]), block_mix(u[..., C:]))``.
    """
    return SPATIAL_WEIGHTS_DISPATCHER.run(make_spatial_weights_call(u, grid_weight, grid_bias, grid_size,
                                                                    block_weight, block_bias, block_size), backend)
