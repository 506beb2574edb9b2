"""Vision token mixers on channels-last images ``(B, Y, X, C)``: PoolFormer's pooling, FocalNets' focal
modulation, DaViT's channel group attention, GC ViT's global-query window attention, HAT's overlapping
cross-attention and channel gate, MAXIM's axis token mixing and cross gating, CrossFormer's long-short distance
attention, NiNformer's token-mixing gate, OverLoCK's ContMix and dynamic depthwise aggregation, and the pooling /
point / temporal heads of ACMIL, MEDUSA, RISurConv and CSA. Importing this package registers each op for
``ak.explain``."""

from attnkit.ops.vision.acmil import acmil_pool
from attnkit.ops.vision.channel import channel_group_attention
from attnkit.ops.vision.contmix import contmix
from attnkit.ops.vision.cross_gating import multi_axis_spatial_weights
from attnkit.ops.vision.csa import class_semantic_attention
from attnkit.ops.vision.dynamic_conv import dynamic_depthwise_conv
from attnkit.ops.vision.focal import focal_modulation
from attnkit.ops.vision.gate import channel_gate
from attnkit.ops.vision.global_query import global_query_window_attention
from attnkit.ops.vision.gmlp import axis_token_mixing
from attnkit.ops.vision.lsda import long_short_distance_attention
from attnkit.ops.vision.medusa import multiscale_gate
from attnkit.ops.vision.ninformer import token_mixing_mlp
from attnkit.ops.vision.overlap import overlapping_window_attention
from attnkit.ops.vision.pool import pool_mixer
from attnkit.ops.vision.risur import risp_features, surface_attention

__all__ = [
    "acmil_pool",
    "axis_token_mixing",
    "channel_gate",
    "channel_group_attention",
    "class_semantic_attention",
    "contmix",
    "dynamic_depthwise_conv",
    "focal_modulation",
    "global_query_window_attention",
    "long_short_distance_attention",
    "multi_axis_spatial_weights",
    "multiscale_gate",
    "overlapping_window_attention",
    "pool_mixer",
    "risp_features",
    "surface_attention",
    "token_mixing_mlp",
]
