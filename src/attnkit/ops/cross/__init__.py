"""Cross-attention ops: queries from one stream attend to keys and values of another.

``varlen_cross_attention`` (packed variable-length pairs), ``ip_adapter_attention`` (IP-Adapter's
decoupled text/image softmaxes), ``glca_attention`` and ``attention_rollout`` (DCAL), ``filip_similarity``
(FILIP's late interaction), ``zero_param_pool`` (GreenPLM); each dispatched op has a ``"reference"``
backend on its naive twin and ``ak.explain`` (importing this package registers them).
"""

from attnkit.ops.cross.filip import filip_similarity
from attnkit.ops.cross.glca import attention_rollout, glca_attention
from attnkit.ops.cross.ip_adapter import ip_adapter_attention
from attnkit.ops.cross.pooling import zero_param_pool
from attnkit.ops.cross.varlen import varlen_cross_attention

__all__ = ["attention_rollout", "filip_similarity", "glca_attention", "ip_adapter_attention", "varlen_cross_attention",
           "zero_param_pool"]
