"""Cross-attention ops: queries from one stream attend to keys and values of another.

``varlen_cross_attention`` (packed variable-length pairs), ``ip_adapter_attention`` (IP-Adapter),
``glca_attention`` and ``attention_rollout`` (DCAL), ``filip_similarity`` (FILIP's late interaction),
``zero_param_pool`` (GreenPLM), ``composite_attention`` (EE-MLLM), ``adem_fusion`` (ADEM-VL),
``cell_local_attention`` (Cambrian-1 SVA, Vision Remember), ``spatial_token_map`` (SAT), ``biased_attention``
(RelationNet++) and ``pointer_probs`` (OAT's pointer distribution); each dispatched
op has a ``"reference"`` backend on its naive twin and ``ak.explain`` (importing this package registers them).
"""

from attnkit.ops.cross.adem import adem_fusion
from attnkit.ops.cross.biased import biased_attention, pointer_probs
from attnkit.ops.cross.cell_local import cell_local_attention
from attnkit.ops.cross.composite import composite_attention
from attnkit.ops.cross.filip import filip_similarity
from attnkit.ops.cross.glca import attention_rollout, glca_attention
from attnkit.ops.cross.ip_adapter import ip_adapter_attention
from attnkit.ops.cross.pooling import zero_param_pool
from attnkit.ops.cross.spatial_token import spatial_token_map
from attnkit.ops.cross.varlen import varlen_cross_attention

__all__ = ["adem_fusion", "attention_rollout", "biased_attention", "cell_local_attention", "composite_attention",
           "filip_similarity", "glca_attention", "ip_adapter_attention", "pointer_probs", "spatial_token_map",
           "varlen_cross_attention", "zero_param_pool"]
