"""Per-head attention patterns: every head (or head group) gets its own mask.

``per_head_attention`` (the shared op: query-head groups, one mask each), ``s2_attention``
(S2-Attention's per-head strided layouts), ``moa_attention`` (Mixture of Sparse Attention's per-head
spans), ``moh_gates`` (Mixture-of-Head gates). Importing this package registers the first three
for ``ak.explain``.
"""

from attnkit.ops.per_head.call import HeadGroup, per_head_attention
from attnkit.ops.per_head.moa import moa_attention
from attnkit.ops.per_head.moh import moh_gates
from attnkit.ops.per_head.s2 import s2_attention

__all__ = ["HeadGroup", "moa_attention", "moh_gates", "per_head_attention", "s2_attention"]
