"""Hugging Face transformers' mask functions, read back as ``ak.masks`` patterns.

transformers (``masking_utils``) describes every attention mask as a composition of small index
predicates (``causal_mask_function``, ``sliding_window_overlay(w)``, ``packed_sequence_mask_function``,
``and_masks(...)``) and hands it, with the padding mask and the query/key offsets, to the mask
function registered for the attention implementation. This module reads that composition back
(the predicates' names and the values they closed over) and states it per batch element as an
``ak.masks`` pattern: causal, sliding windows (causal or bidirectional), packed documents (from
``position_ids``), and key padding, so that no ``Nq x Nk`` tensor is built and the blocked backend
skips the empty tiles. A composition it does not know (a model's own ``or_mask_function``, chunked
attention, block overlays) is evaluated the way transformers' ``sdpa_mask`` does, into a dense
boolean mask, and the reason is kept so that ``explain`` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks import Mask, causal, document, sliding_window
from attnkit.masks.base import IntervalMask, interval

_HF = "transformers.masking_utils"


class Untranslatable(Exception):
    """A mask composition with no ``ak.masks`` equivalent here; the message says which part."""


# ---- a key-padding pattern --------------------------------------------------------------------
@dataclass(frozen=True)
class KeyRuns(IntervalMask):
    """Every query sees the keys in the given inclusive runs ``((lo, hi), ...)``: a key padding mask.

    Right or left padding is one run; an arbitrary 2-D padding mask is one run per stretch of
    valid keys. It stays an interval mask, so ``causal() & KeyRuns(...)`` keeps ``O(N)`` tiling.
    """

    runs: tuple[tuple[int, int], ...]

    def __repr__(self) -> str:
        shown = ", ".join(f"{lo}:{hi + 1}" for lo, hi in self.runs[:3])
        more = f", ... x{len(self.runs)}" if len(self.runs) > 3 else ""
        return f"keys[{shown}{more}]"

    @property
    def arity(self) -> int:  # type: ignore[override]
        return max(1, len(self.runs))

    def mask_mod(self, b, h, q_idx, kv_idx):
        out = torch.zeros((), dtype=torch.bool)
        for lo, hi in self.runs:
            out = out | ((kv_idx >= lo) & (kv_idx <= hi))
        return out & (q_idx >= 0)

    def intervals(self, nq, nk):
        runs = self.runs or ((nk, nk - 1),)  # no valid key: one empty interval
        lo = torch.tensor([r[0] for r in runs])[:, None].expand(-1, nq)   # (R, Nq)
        hi = torch.tensor([r[1] for r in runs])[:, None].expand(-1, nq)
        return lo.contiguous(), hi.contiguous()


@dataclass(frozen=True)
class Band(IntervalMask):
    """Keys ``j`` with ``lo <= j - i <= hi`` for query row ``i`` (None: that side is open).

    A causal or sliding-window band whose diagonal is shifted by a KV cache (``j - i`` is relative to
    the cached keys), including bands that do not contain the diagonal (a sliding-window cache).
    """

    lo: int | None
    hi: int | None

    def __repr__(self) -> str:
        return f"band({self.lo}, {self.hi})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        ok = torch.ones((), dtype=torch.bool)
        if self.lo is not None:
            ok = ok & (kv_idx - q_idx >= self.lo)
        if self.hi is not None:
            ok = ok & (kv_idx - q_idx <= self.hi)
        return ok

    def intervals(self, nq, nk):
        q = torch.arange(nq)
        lo = q + self.lo if self.lo is not None else torch.zeros_like(q)
        hi = q + self.hi if self.hi is not None else torch.full_like(q, nk - 1)
        return interval(lo, hi)


def _runs(valid: list[bool]) -> tuple[tuple[int, int], ...]:
    """Inclusive ``(lo, hi)`` runs of True in a list."""
    out, start = [], None
    for j, ok in enumerate([*valid, False]):
        if ok and start is None:
            start = j
        elif not ok and start is not None:
            out.append((start, j - 1))
            start = None
    return tuple(out)


def _lengths(ids: list[int]) -> tuple[int, ...]:
    """Lengths of the runs of equal values: ``[0, 0, 1, 1, 1, 2] -> (2, 3, 1)``."""
    out, n = [], 0
    for j, x in enumerate(ids):
        if j and x != ids[j - 1]:
            out.append(n)
            n = 0
        n += 1
    return tuple([*out, n])


# ---- reading transformers' composition ---------------------------------------------------------
def _cells(fn) -> dict:
    """The values a closure captured, by name."""
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells), strict=True))


@dataclass
class _Bounds:
    """A conjunction, in local indices (query ``i``, key ``j``) of one batch element: ``lo <= j - i <= hi``,
    same document (``docs``: lengths), key ``j`` valid (``keys``: runs)."""

    lo: int | None = None
    hi: int | None = None
    docs: tuple[int, ...] | None = None
    keys: tuple[tuple[int, int], ...] | None = None

    def lower(self, x: int) -> None:
        self.lo = x if self.lo is None else max(self.lo, x)

    def upper(self, x: int) -> None:
        self.hi = x if self.hi is None else min(self.hi, x)


def _name(fn) -> str:
    if getattr(fn, "__module__", None) != _HF:
        raise Untranslatable(f"mask function {getattr(fn, '__qualname__', fn)!r} is not one of transformers' own")
    return fn.__qualname__.replace(".<locals>", "")


def _apply(fn, b: int, d: int, out: _Bounds, packed: bool = False) -> None:
    """Add the constraints of predicate ``fn`` on batch element ``b`` to ``out``.

    ``d = q_offset - kv_offset``: global ``kv - q`` is local ``j - i - d``. Inside a packed remap
    (``packed``) positions restart per document, and differences within a document are local ones.
    """
    name = _name(fn)
    c = _cells(fn)
    if name == "causal_mask_function":                        # kv <= q
        out.upper(d)
    elif name == "bidirectional_mask_function":
        pass
    elif name == "sliding_window_overlay.inner_mask":         # kv > q - w
        out.lower(d + 1 - int(c["sliding_window"]))
    elif name == "sliding_window_bidirectional_overlay.inner_mask":   # |q - kv| <= w
        w = int(c["sliding_window"])
        out.lower(d - w)
        out.upper(d + w)
    elif name == "and_masks.and_mask":
        children = list(c["mask_functions"])
        remaps = [f for f in children if _name(f) == "remap_positions_for_packed_sequence.inner_mask"]
        docs = [f for f in children if _name(f) == "packed_sequence_mask_function.inner_mask"]
        if remaps and not docs:
            raise Untranslatable("positions remapped without a packed-sequence mask")
        for f in children:
            _apply(f, b, d, out, packed)
    elif name == "packed_sequence_mask_function.inner_mask":  # same document
        ids = c["packed_sequence_mask"][b].tolist()
        lengths = _lengths(ids)
        if out.docs is not None and out.docs != lengths:
            raise Untranslatable("two different packings of one sequence")
        out.docs = lengths
    elif name == "remap_positions_for_packed_sequence.inner_mask":
        # the predicate sees positions; transformers splits documents where positions do not step
        # by 1, so inside a document position differences are index differences
        pos = c["position_ids"][b].tolist()
        steps = [0] + [int(pos[j] - pos[j - 1] != 1) for j in range(1, len(pos))]
        ids = torch.tensor(steps).cumsum(0).tolist()
        lengths = _lengths(ids)
        if out.docs is not None and out.docs != lengths:
            raise Untranslatable("position_ids and the packed-sequence mask disagree")
        out.docs = lengths
        if d != 0:
            raise Untranslatable("packed sequences with a cache offset")
        _apply(c["mask_function"], b, 0, out, packed=True)
    elif name == "padding_mask_function.inner_mask":
        raise Untranslatable("a padding predicate inside the composition")  # padding comes as attention_mask
    else:
        raise Untranslatable(f"transformers mask function {name!r}")


def _pattern(bounds: _Bounds, nq: int, nk: int) -> Mask | None:
    """The ``ak.masks`` pattern of a conjunction; constraints that bind no (query, key) pair are dropped."""
    lo, hi = bounds.lo, bounds.hi
    if hi is not None and hi >= nk - 1:          # j - i <= hi holds for every i >= 0, j < nk
        hi = None
    if lo is not None and lo <= -(nq - 1):       # j - i >= lo holds for every i < nq, j >= 0
        lo = None
    parts: list[Mask] = []
    # every part sits at offset 0 (query row i at position i): the cache offset is inside lo / hi
    if lo is None and hi == 0:
        parts.append(causal())
    elif lo is not None and hi is not None and lo <= 0 <= hi:
        parts.append(sliding_window(-lo, hi))    # j in [i + lo, i + hi]
    elif lo is not None or hi is not None:
        parts.append(Band(lo, hi))
    if bounds.docs is not None and len(bounds.docs) > 1:
        parts.append(document(bounds.docs))
    if bounds.keys is not None and bounds.keys != ((0, nk - 1),):
        parts.append(KeyRuns(bounds.keys))
    if not parts:
        return None
    mask = parts[0]
    for p in parts[1:]:
        mask = mask & p
    return mask


def translate(mask_function, batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset,
              padding: torch.Tensor | None) -> tuple[Mask | None, ...]:
    """One ``ak.masks`` pattern (None = full) per batch element for transformers' mask arguments.

    Raises :class:`Untranslatable` for compositions without an equivalent.
    """
    q_offset, kv_offset = int(q_offset), int(kv_offset)   # a static cache passes 0-d tensors
    d = q_offset - kv_offset
    keys = None
    if padding is not None:
        if padding.shape[-1] < kv_length + kv_offset:      # as transformers' prepare_padding_mask
            padding = torch.nn.functional.pad(padding, (0, kv_length + kv_offset - padding.shape[-1]))
        keys = padding[:, kv_offset:kv_offset + kv_length].bool().tolist()
    out = []
    for b in range(batch_size):
        bounds = _Bounds(keys=None if keys is None else _runs(keys[b if len(keys) > 1 else 0]))
        _apply(mask_function, b, d, bounds)
        out.append(_pattern(bounds, q_length, kv_length))
    return tuple(out)


# ---- what the model carries from its mask builder to every attention layer -----------------------
@dataclass(frozen=True, eq=False)
class HFMask:
    """The mask the ``"attnkit"`` mask interface hands a transformers model, passed to every layer.

    Attributes:
        patterns: one ``ak.masks`` pattern (None = full attention) per batch element, or None when
            the composition was not translatable and ``dense`` holds it.
        q_length, kv_length: the query and key lengths the mask was built for.
        dense: bool ``(B, 1, Nq, Nk)`` (True = attend), only for untranslatable compositions.
        reason: why ``dense`` was built ("" otherwise); ``explain`` prints it.
    """

    patterns: tuple[Mask | None, ...] | None
    q_length: int
    kv_length: int
    dense: torch.Tensor | None = None
    reason: str = ""

    # transformers' mask builders test ``mask.ndim``/``mask.shape`` of a mask handed back to them
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b = self.dense.shape[0] if self.patterns is None else len(self.patterns)
        return (b, 1, self.q_length, self.kv_length)

    def to_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``(B, 1, Nq, Nk)``, True = attend (for the reference and the SDPA fallback)."""
        if self.patterns is None:
            return self.dense.to(device) if device is not None else self.dense
        rows = [torch.ones(self.q_length, self.kv_length, dtype=torch.bool) if p is None
                else p.to_dense(self.q_length, self.kv_length) for p in self.patterns]
        out = torch.stack(rows)[:, None]                                   # (B, 1, Nq, Nk)
        return out.to(device) if device is not None else out

    def describe(self) -> str:
        if self.patterns is None:
            return f"dense bool mask {tuple(self.dense.shape)} ({self.reason})"
        names = ["full" if p is None else repr(p) for p in self.patterns]
        if len(set(names)) == 1:
            return names[0]
        return "per batch element: " + "; ".join(names)
