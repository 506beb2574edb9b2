"""Mask patterns as small immutable objects (``docs/design.md`` §4), one concept per file.

Every mask offers ``mask_mod`` (FlexAttention's predicate), ``to_dense``, exact ``blocks`` and
``density`` without materialising ``Nq x Nk``, a readable repr, and composes with ``&``, ``|``, ``~``.

Every factory takes ``offset=``: query row ``i`` of a call sits at position ``i + offset`` (keys at
``0..Nk-1``), and ``&``, ``|``, ``~`` carry it; masks whose offsets disagree refuse to combine.
``align_bottom_right(mask, nq, nk)`` sets ``offset = nk - nq`` for decoding the tail of a sequence.

Example:
    >>> m = ak.masks.causal() & ak.masks.sliding_window(512)
    >>> m.density(8192, 8192)
    >>> print(ak.masks.show(m, 24))
    >>> last = ak.masks.align_bottom_right(m, 16, 8192)   # the last 16 queries against all 8192 keys
"""

from __future__ import annotations

from torch import Tensor as _Tensor

from attnkit.masks.align import align_bottom_right
from attnkit.masks.base import EMPTY, FULL, PARTIAL, IntervalMask, Mask
from attnkit.masks.block_sparse import block_sparse
from attnkit.masks.causal import causal
from attnkit.masks.chunk import block_causal, chunked
from attnkit.masks.cross import (
    causal_cross,
    composite,
    first_frame,
    frame_causal,
    key_padding,
    mixed_attention,
    varlen_cross,
)
from attnkit.masks.document import causal_blockwise, document, prefix_lm_document, share_question
from attnkit.masks.hash_sparse import hash_sparse
from attnkit.masks.neighborhood import neighborhood_mask as neighborhood
from attnkit.masks.prefix import global_tokens, prefix_lm
from attnkit.masks.qk_sparse import qk_sparse
from attnkit.masks.show import plot, show
from attnkit.masks.strided import strided
from attnkit.masks.tensor import TensorMask
from attnkit.masks.window import dilated_sliding_window, sliding_window


def as_mask(mask: object) -> Mask:
    """A :class:`Mask` from a Mask or a bool tensor broadcastable to ``(B, H, Nq, Nk)``."""
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, _Tensor):
        return TensorMask(mask)
    raise TypeError(f"mask must be an attnkit Mask, a bool tensor or None, got {type(mask).__name__}")


# name -> factory with example arguments: what `attnkit masks show NAME` and the benchmark iterate.
ZOO = {
    "full": lambda n: None,
    "causal": lambda n: causal(),
    "sliding_window": lambda n: sliding_window(max(1, n // 16)),
    "sliding_window_causal": lambda n: causal() & sliding_window(max(1, n // 16)),
    "dilated_sliding_window": lambda n: dilated_sliding_window(max(1, n // 32), 2),
    "chunked": lambda n: chunked(max(1, n // 8)),
    "block_causal": lambda n: block_causal(max(1, n // 8)),
    "full_document": lambda n: document(_doc_lengths(n)),
    "causal_document": lambda n: causal() & document(_doc_lengths(n)),
    "prefix_lm_causal": lambda n: prefix_lm(n // 4),
    "prefix_lm_document": lambda n: prefix_lm_document(_doc_lengths(n), 2),
    "global_sliding_window": lambda n: sliding_window(max(1, n // 16)) | global_tokens(max(1, n // 16)),
    "share_question": lambda n: share_question(_doc_lengths(n)),
    "causal_blockwise": lambda n: causal_blockwise(_doc_lengths(n)),
    "block_causal_document": lambda n: block_causal(max(1, n // 16)) & document(_doc_lengths(n)),
    "strided": lambda n: strided(max(1, n // 16)),
}


def _doc_lengths(n: int) -> list[int]:
    """A deterministic skewed mix of document lengths summing to ``n`` (long and short documents)."""
    fractions = (0.4, 0.1, 0.25, 0.05, 0.2)
    lengths = [max(1, int(n * f)) for f in fractions]
    lengths[-1] += n - sum(lengths)
    return [x for x in lengths if x > 0] if lengths[-1] > 0 else [n]


def zoo(name: str, n: int, *, offset: int = 0) -> Mask | None:
    """A mask of the zoo sized for ``n`` tokens (``None`` for ``full``), with query row ``i`` at
    position ``i + offset`` (``offset = n - m``: the last ``m`` queries against all ``n`` keys)."""
    if name not in ZOO:
        raise KeyError(f"unknown mask {name!r}; known: {', '.join(ZOO)}")
    mask = ZOO[name](n)
    return mask if mask is None else mask.with_offset(offset)


__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "ZOO",
    "IntervalMask",
    "Mask",
    "TensorMask",
    "align_bottom_right",
    "as_mask",
    "block_causal",
    "block_sparse",
    "causal",
    "causal_blockwise",
    "causal_cross",
    "chunked",
    "composite",
    "dilated_sliding_window",
    "document",
    "first_frame",
    "frame_causal",
    "global_tokens",
    "hash_sparse",
    "key_padding",
    "mixed_attention",
    "neighborhood",
    "plot",
    "prefix_lm",
    "prefix_lm_document",
    "qk_sparse",
    "share_question",
    "show",
    "sliding_window",
    "strided",
    "varlen_cross",
    "zoo",
]


def __dir__() -> list[str]:
    # the submodules (base, window, ...) stay importable, but what the package offers is __all__
    return sorted(__all__)


del annotations
