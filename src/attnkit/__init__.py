"""attnkit: attention mechanisms behind one interface, correct and fast on your machine, measured side by side.

Layout is heads-last everywhere: ``q, k, v`` are ``(B, N, H, D)`` for sequences and
``(B, *spatial, H, D)`` for grids.

Example:
    >>> import torch, attnkit as ak
    >>> q = k = v = torch.randn(1, 128, 4, 32)
    >>> out = ak.attention(q, k, v, mask=ak.masks.causal() & ak.masks.sliding_window(16))
"""

from attnkit import masks
from attnkit._validate import check_finite, checking_finite
from attnkit.ops.base import explain, explainable_ops
from attnkit.ops.channel import eca_attention, ela_attention, large_kernel_attention
from attnkit.ops.cross import ip_adapter_attention, varlen_cross_attention
from attnkit.ops.decode import KVCache, decode_attention
from attnkit.ops.decode.quant import KIVICache, ZipCache
from attnkit.ops.decode.sparse import TidalDecode, streaming_attention
from attnkit.ops.dense import attention
from attnkit.ops.dense.gaussian import gaussian_adaptive
from attnkit.ops.dense.relative import relative_position_attention
from attnkit.ops.dense.softplus import softplus_attention
from attnkit.ops.linear import linear_attention
from attnkit.ops.linear.agent import agent_attention
from attnkit.ops.local import block_attention, criss_cross_attention, grid_attention, halo_attention
from attnkit.ops.memory.titans import titans_memory, titans_retrieve
from attnkit.ops.neighborhood import neighborhood_attention
from attnkit.ops.per_head import moa_attention, per_head_attention, s2_attention
from attnkit.ops.routed import (
    bi_level_routing_attention,
    hyper_attention,
    moba_attention,
    psa_attention,
    pyramid_sparse_attention,
    vmoba_attention,
)
from attnkit.ops.sampling import deformable_attention, deformable_attention_3d
from attnkit.ops.sequence.minimal import minimal_attention
from attnkit.ops.vision import channel_group_attention, focal_modulation, global_query_window_attention, pool_mixer
from attnkit.registry import Family, InputKind, MechanismSpec, Paper, get, info, list_mechanisms, register

__version__ = "0.1.0"

__all__ = [
    "Family",
    "InputKind",
    "KIVICache",
    "KVCache",
    "MechanismSpec",
    "Paper",
    "TidalDecode",
    "ZipCache",
    "agent_attention",
    "attention",
    "bi_level_routing_attention",
    "block_attention",
    "channel_group_attention",
    "check_finite",
    "checking_finite",
    "criss_cross_attention",
    "decode_attention",
    "deformable_attention",
    "deformable_attention_3d",
    "eca_attention",
    "ela_attention",
    "explain",
    "explainable_ops",
    "focal_modulation",
    "gaussian_adaptive",
    "get",
    "global_query_window_attention",
    "grid_attention",
    "halo_attention",
    "hyper_attention",
    "info",
    "ip_adapter_attention",
    "large_kernel_attention",
    "linear_attention",
    "list_mechanisms",
    "masks",
    "minimal_attention",
    "moa_attention",
    "moba_attention",
    "neighborhood_attention",
    "per_head_attention",
    "pool_mixer",
    "psa_attention",
    "pyramid_sparse_attention",
    "register",
    "relative_position_attention",
    "s2_attention",
    "softplus_attention",
    "streaming_attention",
    "titans_memory",
    "titans_retrieve",
    "varlen_cross_attention",
    "vmoba_attention",
]
