"""Vision token mixers on channels-last images ``(B, Y, X, C)``: PoolFormer's pooling, FocalNets' focal
modulation, DaViT's channel group attention, GC ViT's global-query window attention, HAT's overlapping
cross-attention and channel gate, MAXIM's axis token mixing and OverLoCK's dynamic depthwise aggregation.
Importing this package registers each op for ``ak.explain``."""

from attnkit.ops.vision.channel import channel_group_attention
from attnkit.ops.vision.dynamic_conv import dynamic_depthwise_conv
from attnkit.ops.vision.focal import focal_modulation
from attnkit.ops.vision.gate import channel_gate
from attnkit.ops.vision.global_query import global_query_window_attention
from attnkit.ops.vision.gmlp import axis_token_mixing
from attnkit.ops.vision.overlap import overlapping_window_attention
from attnkit.ops.vision.pool import pool_mixer

__all__ = ["axis_token_mixing", "channel_gate", "channel_group_attention", "dynamic_depthwise_conv",
           "focal_modulation", "global_query_window_attention", "overlapping_window_attention", "pool_mixer"]
