"""``ak.neighborhood_attention``: NATTEN semantics in 1-D/2-D/3-D; the op (``call``) and its backends."""

from attnkit.ops.neighborhood.call import neighborhood_attention

__all__ = ["neighborhood_attention"]
