"""``ak.linear_attention``: linear / Lightning attention; the op (``call``), chunked and recurrent paths."""

from attnkit.ops.linear.call import linear_attention

__all__ = ["linear_attention"]
