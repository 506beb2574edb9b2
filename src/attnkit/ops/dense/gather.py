"""Dispatch entry for the block-gather engine: routed, per-(batch, head) block-sparse masks.

``ak.attention(q, k, v, mask=ak.masks.block_sparse(layout_BHqk, block))`` lands here, and so
does ``block_sparse(...) & m`` when ``m`` is the same for every head (``m`` then masks inside
the selected blocks, e.g. MoBA's causal diagonal).
"""

from __future__ import annotations

from attnkit.kernels.gather import block_gather_attention
from attnkit.masks.block_sparse import BlockSparse
from attnkit.masks.combine import _GenericAnd
from attnkit.ops.base import Backend


def _split(mask):
    """``(block_sparse, extra_mask)`` if the mask is a layout, optionally ``&`` a head-independent mask."""
    if isinstance(mask, BlockSparse):
        return mask, None
    if isinstance(mask, _GenericAnd):
        for a, b in ((mask.a, mask.b), (mask.b, mask.a)):
            if isinstance(a, BlockSparse) and not b.head_dependent:
                return a, b
    return None, None


def _supports(call):
    layout, _ = _split(call.mask)
    if layout is None:
        return False, "needs a block_sparse layout (optionally & a head-independent mask)"
    return True, ""


def _suits(call):
    layout, _ = _split(call.mask)
    if layout is not None and layout.head_dependent:
        return True, "routed layout differs per (batch, head): gathers each row's blocks"
    return False, "the layout is the same for every head; the tile walk shares work across heads"


def _run(call):
    layout, extra = _split(call.mask)
    res = block_gather_attention(call.q, call.k, call.v, layout.l4, (layout.block_q, layout.block_k),
                                 extra_mask=extra, scale=call.scale, return_lse=call.return_lse)
    return res


BACKEND = Backend(name="gather", run=_run, supports=_supports, suits=_suits,
                  note="per-(batch, head) block gather; autograd backward")
