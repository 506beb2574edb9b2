"""Cross-attention ops: queries from one stream attend to keys and values of another.

``varlen_cross_attention`` (packed variable-length pairs), ``ip_adapter_attention`` (IP-Adapter's
decoupled text/image softmaxes); each a dispatched op with a ``"reference"`` backend on its naive
twin and ``ak.explain`` (importing this package registers them).
"""

from attnkit.ops.cross.ip_adapter import ip_adapter_attention
from attnkit.ops.cross.varlen import varlen_cross_attention

__all__ = ["ip_adapter_attention", "varlen_cross_attention"]
