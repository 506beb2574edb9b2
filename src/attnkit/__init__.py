"""attnkit: attention mechanisms behind one interface, correct and fast on your machine, measured side by side.

Layout is heads-last everywhere: ``q, k, v`` are ``(B, N, H, D)`` for sequences and
``(B, *spatial, H, D)`` for grids.

Example:
    >>> import torch, attnkit as ak
    >>> q = k = v = torch.randn(1, 128, 4, 32)
    >>> out = ak.attention(q, k, v, mask=ak.masks.causal() & ak.masks.sliding_window(16))
"""

from attnkit import masks
from attnkit.ops.base import explain
from attnkit.ops.dense.call import attention
from attnkit.ops.linear.call import linear_attention
from attnkit.ops.neighborhood.call import neighborhood_attention
from attnkit.registry import MechanismSpec, Paper, get, info, list_mechanisms, register

__version__ = "0.1.0"

__all__ = [
    "MechanismSpec",
    "Paper",
    "attention",
    "explain",
    "get",
    "info",
    "linear_attention",
    "list_mechanisms",
    "masks",
    "neighborhood_attention",
    "register",
]
