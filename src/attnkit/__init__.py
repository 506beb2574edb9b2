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
from attnkit.ops.channel import (
    eca_attention,
    ela_attention,
    large_kernel_attention,
    sdlska_attention,
    ulsam_attention,
)
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
    orion_msp_attention,
    psa_attention,
    pyramid_sparse_attention,
    sparsifiner_attention,
    vmoba_attention,
)
from attnkit.ops.sampling import deformable_attention, deformable_attention_3d
from attnkit.ops.sequence import (
    HybridSpec,
    bam_attention,
    combiner_attention,
    deconstructed_attention,
    got_route,
    hierarchical_attention,
    hybrid_stack,
    kat_attention,
    latent_attention_pool,
    pointer_attention,
    prompt_attention,
    se_attention,
    spatial_mamba_fusion,
)
from attnkit.ops.sequence.minimal import minimal_attention
from attnkit.ops.vision import (
    acmil_pool,
    channel_group_attention,
    class_semantic_attention,
    contmix,
    focal_modulation,
    global_query_window_attention,
    long_short_distance_attention,
    multiscale_gate,
    pool_mixer,
    surface_attention,
)
from attnkit.registry import Family, InputKind, MechanismSpec, Paper, get, info, list_mechanisms, register

__version__ = "0.1.0"

__all__ = [
    "Family",
    "HybridSpec",
    "InputKind",
    "KIVICache",
    "KVCache",
    "MechanismSpec",
    "Paper",
    "TidalDecode",
    "ZipCache",
    "acmil_pool",
    "agent_attention",
    "attention",
    "bam_attention",
    "bi_level_routing_attention",
    "block_attention",
    "channel_group_attention",
    "check_finite",
    "checking_finite",
    "class_semantic_attention",
    "combiner_attention",
    "contmix",
    "criss_cross_attention",
    "decode_attention",
    "deconstructed_attention",
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
    "got_route",
    "grid_attention",
    "halo_attention",
    "hierarchical_attention",
    "hybrid_stack",
    "hyper_attention",
    "info",
    "ip_adapter_attention",
    "kat_attention",
    "large_kernel_attention",
    "latent_attention_pool",
    "linear_attention",
    "list_mechanisms",
    "long_short_distance_attention",
    "masks",
    "minimal_attention",
    "moa_attention",
    "moba_attention",
    "multiscale_gate",
    "neighborhood_attention",
    "orion_msp_attention",
    "per_head_attention",
    "pointer_attention",
    "pool_mixer",
    "prompt_attention",
    "psa_attention",
    "pyramid_sparse_attention",
    "register",
    "relative_position_attention",
    "s2_attention",
    "sdlska_attention",
    "se_attention",
    "softplus_attention",
    "sparsifiner_attention",
    "spatial_mamba_fusion",
    "streaming_attention",
    "surface_attention",
    "titans_memory",
    "titans_retrieve",
    "ulsam_attention",
    "varlen_cross_attention",
    "vmoba_attention",
]
