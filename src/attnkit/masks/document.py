"""Packed-sequence masks from document lengths (LongCA-bench's varlen patterns).

All take ``lengths``: the lengths of the documents packed into one sequence, in order; they
apply to self-attention over that sequence (``Nq == Nk == sum(lengths)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import IntervalMask, interval


def _lengths(lengths: object, name: str = "lengths", minimum: int = 1) -> tuple[int, ...]:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or not lengths:
        raise TypeError(f"{name} must be a non-empty list of ints, got {lengths!r}")
    return tuple(int_arg(f"{name}[{i}]", int(x), minimum) for i, x in enumerate(lengths))


def _short(lengths: tuple[int, ...]) -> str:
    return str(list(lengths)) if len(lengths) <= 4 else f"[{lengths[0]}, {lengths[1]}, ... x{len(lengths)}]"


@dataclass(frozen=True)
class _Packed(IntervalMask):
    lengths: tuple[int, ...]

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
        if not (nq == nk == self.total):
            raise ValueError(f"{self!r} covers {self.total} tokens (sum of lengths) but got Nq={nq}, Nk={nk}")


@dataclass(frozen=True)
class Document(_Packed):
    """Block-diagonal by document: a token sees every token of its own document."""

    def __repr__(self) -> str:
        return f"document({_short(self.lengths)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.doc_id[q_idx] == self.doc_id[kv_idx]

    def intervals(self, nq, nk):
        return interval(self.doc_start, self.doc_end)


@dataclass(frozen=True)
class PrefixLMDocument(_Packed):
    """Inside each document, its first ``prefix[d]`` tokens are visible to all of it; the rest is causal."""

    prefix: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"prefix_lm_document({_short(self.lengths)}, prefix={_short(self.prefix)})"

    @cached_property
    def _prefix_end(self) -> torch.Tensor:
        return self.doc_start + torch.tensor(self.prefix)[self.doc_id] - 1

    def mask_mod(self, b, h, q_idx, kv_idx):
        same = self.doc_id[q_idx] == self.doc_id[kv_idx]
        return same & ((kv_idx <= q_idx) | (kv_idx <= self._prefix_end[q_idx]))

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        return interval(self.doc_start, torch.maximum(q, self._prefix_end))


@dataclass(frozen=True)
class ShareQuestion(_Packed):
    """The first two documents form one causal block (a shared prompt); each later document is
    causal within itself and also sees that shared prefix."""

    arity = 2

    def __repr__(self) -> str:
        return f"share_question({_short(self.lengths)})"

    @cached_property
    def shared(self) -> int:
        return sum(self.lengths[:2])

    def mask_mod(self, b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        in_shared = kv_idx < self.shared
        return causal & (in_shared | (self.doc_id[q_idx] == self.doc_id[kv_idx]))

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        head = q < self.shared
        lo1, hi1 = torch.zeros_like(q), torch.where(head, q, self.shared - 1)
        lo2 = torch.where(head, nk, self.doc_start)  # empty for rows inside the shared prompt
        return torch.stack([lo1, lo2]), torch.stack([hi1, q])


@dataclass(frozen=True)
class CausalBlockwise(_Packed):
    """Causal within each document, except the last document sees the whole sequence."""

    def __repr__(self) -> str:
        return f"causal_blockwise({_short(self.lengths)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        last = self.doc_id[q_idx] == len(self.lengths) - 1
        same = self.doc_id[q_idx] == self.doc_id[kv_idx]
        return last | (same & (kv_idx <= q_idx))

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        last = self.doc_id == len(self.lengths) - 1
        return interval(torch.where(last, 0, self.doc_start), torch.where(last, nk - 1, q))


def document(lengths) -> Document:
    """Full attention inside each packed document; ``causal() & document(lengths)`` is causal-document."""
    return Document(_lengths(lengths))


def prefix_lm_document(lengths, prefix) -> PrefixLMDocument:
    """Per document: a fully visible prefix (``prefix``: an int for all, or one per document), then causal."""
    lengths = _lengths(lengths)
    prefix = (int(prefix),) * len(lengths) if isinstance(prefix, int) else _lengths(prefix, "prefix", minimum=0)
    if len(prefix) != len(lengths):
        raise ValueError(f"prefix has {len(prefix)} entries but there are {len(lengths)} documents")
    if any(p > n for p, n in zip(prefix, lengths)) or any(p < 0 for p in prefix):
        raise ValueError(f"each prefix must be in [0, its document length]; got {prefix} for {lengths}")
    return PrefixLMDocument(lengths, prefix)


def share_question(lengths) -> ShareQuestion:
    """LongCA-bench's shared-question pattern; needs at least two documents."""
    lengths = _lengths(lengths)
    if len(lengths) < 2:
        raise ValueError(f"share_question needs at least 2 documents, got {len(lengths)}")
    return ShareQuestion(lengths)


def causal_blockwise(lengths) -> CausalBlockwise:
    """LongCA-bench's causal-blockwise pattern: causal documents, the last one sees everything."""
    return CausalBlockwise(_lengths(lengths))
