"""Bottom-right alignment: the last ``Nq`` positions of a sequence against all ``Nk`` of its keys.

Masks are top-left aligned by default (query row ``i`` at position ``i``, as SDPA's ``is_causal`` and
FlexAttention). Decoding, or any call whose queries are the tail of the key sequence, needs the
query rows at positions ``Nk - Nq .. Nk - 1``: the same mask with ``offset = Nk - Nq``.
"""

from __future__ import annotations

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import Mask


def align_bottom_right(mask: Mask | torch.Tensor | None, nq: int, nk: int) -> Mask | None:
    """``mask`` with its query rows at the last ``nq`` of ``nk`` positions: ``mask.with_offset(nk - nq)``.

    Every leaf of a combination gets the new offset (it replaces the old one). A bool tensor mask is
    already in the call's own coordinates and comes back wrapped but unchanged; ``None`` stays ``None``.

    Example:
        >>> m = ak.masks.causal() & ak.masks.sliding_window(64)                 # written for N x N
        >>> out = ak.attention(q[:, -16:], k, v, mask=ak.masks.align_bottom_right(m, 16, k.shape[1]))
        >>> # equals ak.attention(q, k, v, mask=m)[:, -16:]
    """
    nq = int_arg("align_bottom_right: nq", nq, 1)
    nk = int_arg("align_bottom_right: nk", nk, 1)
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        from attnkit.masks.tensor import TensorMask
        return TensorMask(mask)
    if not isinstance(mask, Mask):
        raise TypeError(f"align_bottom_right: mask must be an attnkit Mask, a bool tensor or None, "
                        f"got {type(mask).__name__}")
    return mask.with_offset(nk - nq)
