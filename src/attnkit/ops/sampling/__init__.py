"""Sampling and pooling ops: deformable attention (2-D, DFA3D's 3-D), slot attention, attention pooling and
spatial pyramid pooling. Importing this package registers each op for ``ak.explain``."""

from attnkit.ops.sampling.deformable import deformable_attention, deformable_attention_3d
from attnkit.ops.sampling.pooling import slot_attention_step, spatial_pyramid_pool

__all__ = ["deformable_attention", "deformable_attention_3d", "slot_attention_step", "spatial_pyramid_pool"]
