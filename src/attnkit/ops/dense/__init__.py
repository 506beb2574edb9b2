"""``ak.attention``: softmax attention under any mask; the op (``call``) and its backends."""

from attnkit.ops.dense.call import attention

__all__ = ["attention"]
