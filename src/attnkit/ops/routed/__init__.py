"""Routed attention: each query (or query block) picks the key blocks it attends to from the data.

``moba`` (MoBA), ``vmoba`` (VMoBA), ``psa`` (Pyramid Sparse Attention), ``hyper``
(HyperAttention), ``biformer`` (BiFormer's bi-level routing), ``sparsifiner`` (Sparsifiner's predicted
connectivity) and ``orion`` (Orion-MSP's window + global + random blocks): each a dispatched op with its
backends, a ``"reference"`` backend on the naive twin, and ``explain`` (importing this package registers them).
"""

from attnkit.ops.routed.biformer import bi_level_routing_attention
from attnkit.ops.routed.hyper import hyper_attention
from attnkit.ops.routed.moba import moba_attention
from attnkit.ops.routed.orion import orion_msp_attention, orion_msp_mask
from attnkit.ops.routed.psa import psa_attention, pyramid_sparse_attention
from attnkit.ops.routed.sparsifiner import sparsifiner_attention
from attnkit.ops.routed.vmoba import vmoba_attention

__all__ = [
    "bi_level_routing_attention",
    "hyper_attention",
    "moba_attention",
    "orion_msp_attention",
    "orion_msp_mask",
    "psa_attention",
    "pyramid_sparse_attention",
    "sparsifiner_attention",
    "vmoba_attention",
]
