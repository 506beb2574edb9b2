"""Packed-sequence masks from document lengths (LongCA-bench's varlen patterns).

All take ``lengths``: the lengths of the documents packed into one sequence, in order. Positions
are absolute in that sequence: the keys are the whole sequence (``Nk == sum(lengths)``) and query
row ``q`` sits at position ``q + offset``, which must lie inside it (``offset >= 0``,
``offset + Nq <= sum(lengths)``). Self-attention over the whole sequence is
``Nq == Nk == sum(lengths)`` with ``offset = 0``; decoding its last ``m`` tokens is ``offset = N - m``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, interval, offset_arg


def _lengths(lengths: object, name: str = "lengths", minimum: int = 1) -> tuple[int, ...]:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or not lengths:
        raise TypeError(f"{name} must be a non-empty list of ints, got {lengths!r}")
    return tuple(int_arg(f"{name}[{i}]", int(x), minimum) for i, x in enumerate(lengths))


def _short(lengths: tuple[int, ...]) -> str:
    return str(list(lengths)) if len(lengths) <= 4 else f"[{lengths[0]}, {lengths[1]}, ... x{len(lengths)}]"


def _offset_repr(offset: int) -> str:
    return f", offset={offset}" if offset else ""


@dataclass(frozen=True)
class _Packed(IntervalMask):
    lengths: tuple[int, ...]
    offset: int = 0

    def _rows(self, nq: int) -> torch.Tensor:
        """``(Nq,)`` positions of the query rows."""
        return torch.arange(nq) + self.offset

    @cached_property
    def total(self) -> int:
        return sum(self.lengths)

    @cached_property
    def doc_id(self) -> torch.Tensor:
        """``(N,)`` document index of each position."""
        return torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))

    @cached_property
    def doc_start(self) -> torch.Tensor:
        """``(N,)`` first position of each position's document."""
        starts = torch.tensor((0, *self.lengths[:-1])).cumsum(0)
        return starts[self.doc_id]

    @cached_property
    def doc_end(self) -> torch.Tensor:
        """``(N,)`` last position of each position's document."""
        return self.doc_start + torch.tensor(self.lengths)[self.doc_id] - 1

    def validate(self, nq, nk):
        super().validate(nq, nk)
        if self.offset < 0 or self.offset + nq > self.total or nk != self.total:
            raise ValueError(
                f"{self!r} covers {self.total} tokens (sum of lengths) but got Nq={nq} query rows at positions "
                f"{self.offset}..{self.offset + nq - 1} (offset={self.offset}) and Nk={nk} keys at 0..{nk - 1}")


@dataclass(frozen=True)
class Document(_Packed):
    """Block-diagonal by document: a token sees every token of its own document."""

    def __repr__(self) -> str:
        return f"document({_short(self.lengths)}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.doc_id[q_idx + self.offset] == self.doc_id[kv_idx]

    def intervals(self, nq, nk):
        p = self._rows(nq)
        return interval(self.doc_start[p], self.doc_end[p])


@dataclass(frozen=True)
class PrefixLMDocument(_Packed):
    """Inside each document, its first ``prefix[d]`` tokens are visible to all of it; the rest is causal."""

    prefix: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"prefix_lm_document({_short(self.lengths)}, prefix={_short(self.prefix)}{_offset_repr(self.offset)})"

    @cached_property
    def _prefix_end(self) -> torch.Tensor:
        return self.doc_start + torch.tensor(self.prefix)[self.doc_id] - 1

    def mask_mod(self, b, h, q_idx, kv_idx):
        p = q_idx + self.offset
        same = self.doc_id[p] == self.doc_id[kv_idx]
        return same & ((kv_idx <= p) | (kv_idx <= self._prefix_end[p]))

    def intervals(self, nq, nk):
        p = self._rows(nq)
        return interval(self.doc_start[p], torch.maximum(p, self._prefix_end[p]))


@dataclass(frozen=True)
class ShareQuestion(_Packed):
    """The first two documents form one causal block (a shared prompt); each later document is
    causal within itself and also sees that shared prefix."""

    arity = 2

    def __repr__(self) -> str:
        return f"share_question({_short(self.lengths)}{_offset_repr(self.offset)})"

    @cached_property
    def shared(self) -> int:
        return sum(self.lengths[:2])

    def mask_mod(self, b, h, q_idx, kv_idx):
        p = q_idx + self.offset
        causal = kv_idx <= p
        in_shared = kv_idx < self.shared
        return causal & (in_shared | (self.doc_id[p] == self.doc_id[kv_idx]))

    def intervals(self, nq, nk):
        p = self._rows(nq)
        head = p < self.shared
        lo1, hi1 = torch.zeros_like(p), torch.where(head, p, self.shared - 1)
        lo2 = torch.where(head, nk, self.doc_start[p])  # empty for rows inside the shared prompt
        return torch.stack([lo1, lo2]), torch.stack([hi1, p])


@dataclass(frozen=True)
class CausalBlockwise(_Packed):
    """Causal within each document, except the last document sees the whole sequence."""

    def __repr__(self) -> str:
        return f"causal_blockwise({_short(self.lengths)}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        p = q_idx + self.offset
        last = self.doc_id[p] == len(self.lengths) - 1
        same = self.doc_id[p] == self.doc_id[kv_idx]
        return last | (same & (kv_idx <= p))

    def intervals(self, nq, nk):
        p = self._rows(nq)
        last = self.doc_id[p] == len(self.lengths) - 1
        return interval(torch.where(last, 0, self.doc_start[p]), torch.where(last, nk - 1, p))


def document(lengths, *, offset: int = 0) -> Document:
    """Full attention inside each packed document; ``causal() & document(lengths)`` is causal-document.

    Query row ``q`` is at position ``q + offset`` of the packed sequence (``offset >= 0``).
    """
    return Document(_lengths(lengths), offset_arg(offset, "document", 0))


def prefix_lm_document(lengths, prefix, *, offset: int = 0) -> PrefixLMDocument:
    """Per document: a fully visible prefix (``prefix``: an int for all, or one per document), then causal.

    Query row ``q`` is at position ``q + offset`` of the packed sequence (``offset >= 0``).
    """
    lengths = _lengths(lengths)
    prefix = (int(prefix),) * len(lengths) if isinstance(prefix, int) else _lengths(prefix, "prefix", minimum=0)
    if len(prefix) != len(lengths):
        raise ValueError(f"prefix_lm_document: prefix has {len(prefix)} entries but there are {len(lengths)} documents")
    if any(p > n for p, n in zip(prefix, lengths)) or any(p < 0 for p in prefix):
        raise ValueError(f"prefix_lm_document: each prefix must be in [0, its document length]; "
                         f"got {prefix} for {lengths}")
    return PrefixLMDocument(lengths, offset_arg(offset, "prefix_lm_document", 0), prefix)


def share_question(lengths, *, offset: int = 0) -> ShareQuestion:
    """LongCA-bench's shared-question pattern; needs at least two documents.

    Query row ``q`` is at position ``q + offset`` of the packed sequence (``offset >= 0``).
    """
    lengths = _lengths(lengths)
    if len(lengths) < 2:
        raise ValueError(f"share_question needs at least 2 documents, got {len(lengths)}")
    return ShareQuestion(lengths, offset_arg(offset, "share_question", 0))


def causal_blockwise(lengths, *, offset: int = 0) -> CausalBlockwise:
    """LongCA-bench's causal-blockwise pattern: causal documents, the last one sees everything.

    Query row ``q`` is at position ``q + offset`` of the packed sequence (``offset >= 0``).
    """
    return CausalBlockwise(_lengths(lengths), offset_arg(offset, "causal_blockwise", 0))
