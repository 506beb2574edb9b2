"""Windowed image attention that is not neighborhood attention: HaloNet's blocked halos,
MaxViT's block / grid axes, CCNet's criss-cross paths. Importing this package registers each op
for ``ak.explain``."""

from attnkit.ops.local.criss_cross import criss_cross_attention
from attnkit.ops.local.halo import halo_attention
from attnkit.ops.local.multi_axis import block_attention, grid_attention

__all__ = ["block_attention", "criss_cross_attention", "grid_attention", "halo_attention"]
