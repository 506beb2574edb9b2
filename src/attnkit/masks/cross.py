"""Cross-attention masks: queries and keys from two different streams.

* :func:`key_padding` — per-example valid key (and query) lengths of a padded batch;
* :func:`varlen_cross` — packed variable-length queries and keys: sequence ``s`` holds query rows
  ``cu_q[s]..cu_q[s+1]-1`` and keys ``cu_k[s]..cu_k[s+1]-1``; a query sees its own sequence's keys
  (optionally causal, bottom-right aligned per sequence as FlashAttention's varlen API);
* :func:`causal_cross` — alignment by positions or timestamps: query ``i`` sees the keys whose time
  is ``<= t(i)`` (``t = +inf`` sees every key); key times must be sorted;
* :func:`frame_causal` — Video-CCAM's causal cross-attention mask ("Video-CCAM: Enhancing
  Video-Language Understanding with Causal Cross-Attention Masks for Short and Long Videos",
  arXiv 2408.14023): ``Q`` queries over ``T`` frames of ``P`` tokens, query ``i`` sees frames
  ``0..ceil((i+1) T / Q) - 1``.

Every mask here is a union of key intervals per query row, so ``blocks()`` and ``count()`` are exact
from ``O(Nq)`` interval tables and sparse cross patterns run on the blocked backend's tile walk.
``key_padding`` differs across the batch (``lead_shape == (B, 1)``) and classifies tiles from the
lengths' minimum and maximum, refining only the tiles a length cuts.

Offsets: query row ``i`` sits at position ``i + offset`` of the query stream (its time index for
``causal_cross``, its packed position for ``varlen_cross``, its query index for ``frame_causal``);
keys are always the whole key stream.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import EMPTY, FULL, PARTIAL, IntervalMask, Mask, _ceil_div, interval, offset_arg


def _offset_repr(offset: int) -> str:
    return f", offset={offset}" if offset else ""


def _int_list(values: object, name: str, where: str, minimum: int = 0) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.dim() != 1:
            raise TypeError(f"{where}: {name} must be a 1-D integer tensor or a list of ints, got "
                            f"{values.dtype} {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not values:
        raise TypeError(f"{where}: {name} must be a non-empty list of ints, got {values!r}")
    out = []
    for i, x in enumerate(values):
        out.append(int_arg(f"{where}: {name}[{i}]", x, minimum))
    return tuple(out)


def _short(values: tuple) -> str:
    return str(list(values)) if len(values) <= 4 else f"[{values[0]}, {values[1]}, ... x{len(values)}]"


# ----------------------------------------------------------------------------------- key padding


@dataclass(frozen=True)
class KeyPadding(Mask):
    """``kv < key_lengths[b]`` (and ``q + offset < query_lengths[b]`` when query lengths are given).

    Differs across the batch: ``lead_shape == (B, 1)``. Padded query rows see no key (zeros out).
    """

    key_lengths: tuple[int, ...]
    query_lengths: tuple[int, ...] | None = None
    offset: int = 0

    head_dependent = True

    def __repr__(self) -> str:
        ql = "" if self.query_lengths is None else f", query_lengths={_short(self.query_lengths)}"
        return f"key_padding({_short(self.key_lengths)}{ql}{_offset_repr(self.offset)})"

    @property
    def lead_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return (len(self.key_lengths), 1)

    @cached_property
    def _klen(self) -> torch.Tensor:
        return torch.tensor(self.key_lengths).view(-1, 1, 1, 1)                     # (B, 1, 1, 1)

    @cached_property
    def _qlen(self) -> torch.Tensor | None:
        return None if self.query_lengths is None else torch.tensor(self.query_lengths).view(-1, 1, 1, 1)

    def validate(self, nq: int, nk: int) -> None:
        super().validate(nq, nk)
        if max(self.key_lengths) > nk:
            raise ValueError(f"{self!r}: key_lengths go up to {max(self.key_lengths)} but the keys have Nk={nk}")
        if self.query_lengths is not None and max(self.query_lengths) > self.offset + nq:
            raise ValueError(f"{self!r}: query_lengths go up to {max(self.query_lengths)} but the query rows end at "
                             f"position {self.offset + nq} (Nq={nq}, offset={self.offset})")

    def mask_mod(self, b, h, q_idx, kv_idx):
        ok = kv_idx < torch.tensor(self.key_lengths)[b]
        if self.query_lengths is not None:
            ok = ok & (q_idx + self.offset < torch.tensor(self.query_lengths)[b])
        return ok

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        ok = kv_idx < self._klen.view(-1, 1, *([1] * kv_idx.dim()))                 # (B, 1, ...)
        if self._qlen is not None:
            ok = ok & (q_idx + self.offset < self._qlen.view(-1, 1, *([1] * q_idx.dim())))
        return ok

    def _coarse_blocks(self, nq, nk, bq, bk):
        # exact except where a length cuts a tile: FULL if every example allows the whole tile,
        # EMPTY if none allows any pair of it; those cut tiles are refined by evaluation
        k0 = torch.arange(_ceil_div(nk, bk)) * bk
        k1 = torch.clamp(k0 + bk, max=nk)
        kmin, kmax = min(self.key_lengths), max(self.key_lengths)
        full_k, empty_k = k1 <= kmin, k0 >= kmax                                    # (nkb,)
        q0 = torch.arange(_ceil_div(nq, bq)) * bq + self.offset
        q1 = torch.clamp(q0 + bq, max=nq + self.offset)
        if self.query_lengths is None:
            full_q, empty_q = torch.ones_like(q0, dtype=torch.bool), torch.zeros_like(q0, dtype=torch.bool)
        else:
            full_q, empty_q = q1 <= min(self.query_lengths), q0 >= max(self.query_lengths)
        full = full_q[:, None] & full_k[None, :]
        empty = empty_q[:, None] | empty_k[None, :]
        return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


def key_padding(key_lengths, query_lengths=None, *, offset: int = 0) -> KeyPadding:
    """Padding mask of a batch of cross-attention examples: example ``b`` has ``key_lengths[b]`` valid keys.

    Args:
        key_lengths: ``B`` ints (list or 1-D integer tensor), each in ``[0, Nk]``; keys at or past
            the length are padding. A zero length leaves that example's rows empty (zeros out).
        query_lengths: optional ``B`` ints: query rows at positions ``>= query_lengths[b]`` are
            padding and see no key.
        offset: query row ``i`` sits at position ``i + offset`` (only matters with ``query_lengths``).

    Shape: ``lead_shape == (B, 1)``: the mask broadcasts to ``(B, H, Nq, Nk)``; the tensors' batch
    must be ``B`` (``ak.attention`` refuses another).

    Example:
        >>> ak.attention(q, k, v, mask=key_padding([7, 3]))   # k (2, 7, H, D): example 1 has 3 keys
    """
    where = "key_padding"
    k = _int_list(key_lengths, "key_lengths", where)
    q = None
    if query_lengths is not None:
        q = _int_list(query_lengths, "query_lengths", where)
        if len(q) != len(k):
            raise ValueError(f"{where}: query_lengths has {len(q)} entries but key_lengths has {len(k)} (one per "
                             "example)")
    return KeyPadding(k, q, offset_arg(offset, where, 0))


# ------------------------------------------------------------------------------- packed varlen


@dataclass(frozen=True)
class VarlenCross(IntervalMask):
    """Packed sequences: query position ``p`` in sequence ``s`` sees keys ``cu_k[s]..cu_k[s+1]-1``
    (with ``causal``: only up to local key ``p - cu_q[s] + (Lk_s - Lq_s)``, bottom-right aligned)."""

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    causal: bool = False
    offset: int = 0

    def __repr__(self) -> str:
        c = ", causal=True" if self.causal else ""
        return f"varlen_cross(q={_short(self.q_lengths)}, k={_short(self.k_lengths)}{c}{_offset_repr(self.offset)})"

    @property
    def q_lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in itertools.pairwise(self.cu_q))

    @property
    def k_lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in itertools.pairwise(self.cu_k))

    @cached_property
    def _seq(self) -> torch.Tensor:
        """``(total_q,)`` sequence index of each packed query position."""
        return torch.repeat_interleave(torch.arange(len(self.cu_q) - 1), torch.tensor(self.q_lengths))

    @cached_property
    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` of every packed query position: its allowed key interval."""
        cq, ck = torch.tensor(self.cu_q), torch.tensor(self.cu_k)
        s = self._seq
        lo, hi = ck[s], ck[s + 1] - 1
        if self.causal:
            local = torch.arange(self.cu_q[-1]) - cq[s]
            shift = (ck[s + 1] - ck[s]) - (cq[s + 1] - cq[s])
            hi = torch.minimum(hi, lo + local + shift)
        return lo, hi

    def validate(self, nq, nk):
        super().validate(nq, nk)
        total_q, total_k = self.cu_q[-1], self.cu_k[-1]
        if nk != total_k:
            raise ValueError(f"{self!r}: k_lengths (cu_seqlens_k) sum to {total_k} but the keys have Nk={nk}")
        if self.offset + nq > total_q:
            raise ValueError(f"{self!r}: q_lengths (cu_seqlens_q) sum to {total_q} but the query rows reach position "
                             f"{self.offset + nq - 1} (Nq={nq}, offset={self.offset})")

    def mask_mod(self, b, h, q_idx, kv_idx):
        lo, hi = self._bounds
        p = q_idx + self.offset
        return (kv_idx >= lo[p]) & (kv_idx <= hi[p])

    def intervals(self, nq, nk):
        lo, hi = self._bounds
        p = torch.arange(nq) + self.offset
        return interval(lo[p], hi[p])


def _cu(offsets: object, name: str, where: str) -> tuple[int, ...]:
    cu = _int_list(offsets, name, where)
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"{where}: {name} must start at 0 and hold one entry more than there are sequences, got "
                         f"{_short(cu)}")
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        if b < a:
            raise ValueError(f"{where}: {name} must be non-decreasing (sequence {i} would have length {b - a})")
    return cu


def varlen_cross(q_lengths=None, k_lengths=None, *, cu_seqlens_q=None, cu_seqlens_k=None, causal: bool = False,
                 offset: int = 0) -> VarlenCross:
    """Packed variable-length cross-attention: sequence ``s``'s queries see only sequence ``s``'s keys.

    Give either the lengths (``q_lengths``, ``k_lengths``: one int >= 0 per sequence) or the
    per-sequence start offsets on both sides (``cu_seqlens_q``, ``cu_seqlens_k``: ``S + 1``
    non-decreasing ints from 0, FlashAttention's varlen convention). Query and key tensors are the
    packed streams: ``q (1, sum Lq, H, D)``, ``k, v (1, sum Lk, H, D)``.

    Args:
        causal: query ``j`` of a sequence sees its keys ``0..j + Lk - Lq`` (bottom-right aligned).
        offset: query row ``i`` sits at packed query position ``i + offset``.

    Example:
        >>> m = varlen_cross([5, 3], [4, 9])       # q (1, 8, H, D), k (1, 13, H, D)
        >>> ak.attention(q, k, v, mask=m)
    """
    where = "varlen_cross"
    if (q_lengths is None) != (k_lengths is None) or (cu_seqlens_q is None) != (cu_seqlens_k is None) or \
            (q_lengths is None) == (cu_seqlens_q is None):
        raise TypeError(f"{where}: give q_lengths and k_lengths, or cu_seqlens_q and cu_seqlens_k")
    if q_lengths is not None:
        ql, kl = _int_list(q_lengths, "q_lengths", where), _int_list(k_lengths, "k_lengths", where)
        if len(ql) != len(kl):
            raise ValueError(f"{where}: q_lengths has {len(ql)} sequences but k_lengths has {len(kl)}")
        cu_q = tuple(int(x) for x in torch.tensor((0, *ql)).cumsum(0))
        cu_k = tuple(int(x) for x in torch.tensor((0, *kl)).cumsum(0))
    else:
        cu_q, cu_k = _cu(cu_seqlens_q, "cu_seqlens_q", where), _cu(cu_seqlens_k, "cu_seqlens_k", where)
        if len(cu_q) != len(cu_k):
            raise ValueError(f"{where}: cu_seqlens_q describes {len(cu_q) - 1} sequences but cu_seqlens_k "
                             f"{len(cu_k) - 1}")
    if cu_q[-1] == 0 or cu_k[-1] == 0:
        raise ValueError(f"{where}: the query and key lengths must not all be 0")
    return VarlenCross(cu_q, cu_k, bool(causal), offset_arg(offset, where, 0))


# ------------------------------------------------------------------------ causal by time / position


@dataclass(frozen=True, eq=False)
class CausalCross(IntervalMask):
    """Query ``i`` sees the keys with ``key_times[j] <= query_times[i + offset]`` (a key prefix,
    as key times are sorted)."""

    query_times: torch.Tensor
    key_times: torch.Tensor
    offset: int = 0

    def __repr__(self) -> str:
        return f"causal_cross(Nq={self.query_times.numel()}, Nk={self.key_times.numel()}{_offset_repr(self.offset)})"

    @cached_property
    def _hi(self) -> torch.Tensor:
        """``(len(query_times),)`` last visible key of every query (-1: none)."""
        return torch.searchsorted(self.key_times, self.query_times, right=True) - 1

    def validate(self, nq, nk):
        super().validate(nq, nk)
        if nk != self.key_times.numel():
            raise ValueError(f"{self!r}: key_times has {self.key_times.numel()} entries but the keys have Nk={nk}")
        if self.offset + nq > self.query_times.numel():
            raise ValueError(f"{self!r}: query_times has {self.query_times.numel()} entries but the query rows reach "
                             f"{self.offset + nq - 1} (Nq={nq}, offset={self.offset})")

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.key_times[kv_idx] <= self.query_times[q_idx + self.offset]

    def intervals(self, nq, nk):
        hi = self._hi[self.offset:self.offset + nq]
        return interval(torch.zeros_like(hi), hi)


def _times(t: object, name: str, where: str) -> torch.Tensor:
    if isinstance(t, (list, tuple)):
        try:
            t = torch.tensor(t, dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{where}: {name} must be a list of numbers or a 1-D tensor") from None
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0 or t.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must be a non-empty 1-D tensor or list of numbers, got "
                        f"{getattr(t, 'shape', type(t).__name__)}")
    t = t.detach().to("cpu", torch.float64)
    if torch.isnan(t).any():
        raise ValueError(f"{where}: {name} contains NaN")
    return t


def causal_cross(query_times, key_times, *, offset: int = 0) -> CausalCross:
    """Causal cross alignment by positions or timestamps: query ``i`` sees keys with time ``<= t(i)``.

    Args:
        query_times: ``(Nq,)`` numbers (positions or timestamps; ``+inf`` sees every key), any order.
        key_times: ``(Nk,)`` numbers, sorted non-decreasing (``ValueError`` naming ``key_times``
            otherwise): the allowed keys of a query are then a prefix, which makes tiles exact.
        offset: query row ``i`` reads ``query_times[i + offset]``.

    Example:
        >>> m = causal_cross(torch.tensor([0.5, 1.0, 2.5]), torch.tensor([0., 0., 1., 2., 3.]))
        >>> m.to_dense(3, 5)   # rows see 2, 3 and 4 keys
    """
    where = "causal_cross"
    qt, kt = _times(query_times, "query_times", where), _times(key_times, "key_times", where)
    if kt.numel() > 1 and (kt[1:] < kt[:-1]).any():
        i = int((kt[1:] < kt[:-1]).nonzero()[0])
        raise ValueError(f"{where}: key_times must be sorted non-decreasing; key_times[{i + 1}] = {kt[i + 1].item()} "
                         f"< key_times[{i}] = {kt[i].item()}")
    return CausalCross(qt, kt, offset_arg(offset, where, 0))


@dataclass(frozen=True)
class FrameCausal(IntervalMask):
    """Video-CCAM: query ``p = i + offset`` of ``Q`` sees frames ``0..ceil((p + 1) T / Q) - 1`` of ``P`` tokens each."""

    num_queries: int
    num_frames: int
    tokens_per_frame: int
    offset: int = 0

    def __repr__(self) -> str:
        return (f"frame_causal(Q={self.num_queries}, T={self.num_frames}, P={self.tokens_per_frame}"
                f"{_offset_repr(self.offset)})")

    def last_frame(self, p: torch.Tensor) -> torch.Tensor:
        """``f(p) = ceil((p + 1) T / Q) - 1``: the last frame query ``p`` sees."""
        return -torch.div(-(p + 1) * self.num_frames, self.num_queries, rounding_mode="floor") - 1

    def validate(self, nq, nk):
        super().validate(nq, nk)
        t, p = self.num_frames, self.tokens_per_frame
        if not (t - 1) * p < nk <= t * p:
            raise ValueError(f"{self!r}: the keys must be the T * P = {t * p} visual tokens (frame-major; the last "
                             f"frame may be shorter: Nk in ({(t - 1) * p}, {t * p}]), got Nk={nk}")
        if self.offset + nq > self.num_queries:
            raise ValueError(f"{self!r}: num_queries is {self.num_queries} but the query rows reach "
                             f"{self.offset + nq - 1} (Nq={nq}, offset={self.offset})")

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx // self.tokens_per_frame <= self.last_frame(q_idx + self.offset)

    def intervals(self, nq, nk):
        f = self.last_frame(torch.arange(nq) + self.offset)
        return interval(torch.zeros_like(f), (f + 1) * self.tokens_per_frame - 1)


def frame_causal(num_queries: int, num_frames: int, tokens_per_frame: int, *, offset: int = 0) -> FrameCausal:
    """Video-CCAM's causal cross-attention mask (arXiv 2408.14023, §3): ``Q`` learnable queries over
    ``T`` frames of ``P`` visual tokens (frame-major, ``Nk = T * P``; the last frame may be shorter,
    ``(T - 1) P < Nk <= T P``).

    Query ``i`` sees frames ``0..f(i)`` with ``f(i) = ceil((i + 1) T / Q) - 1``: every query sees
    frame 0, the last one sees the whole video, ``T = 1`` is full cross-attention and, for ``Q = T``
    and ``P = 1``, the mask is ordinary causal. The paper does not state the rounding for ``Q`` not
    a multiple of ``T``; the ceiling never leaves a row empty.

    Example:
        >>> m = frame_causal(16, 4, 49)    # 16 queries over 4 frames of 7 x 7 tokens
    """
    where = "frame_causal"
    return FrameCausal(int_arg(f"{where}: num_queries", num_queries, 1), int_arg(f"{where}: num_frames", num_frames, 1),
                       int_arg(f"{where}: tokens_per_frame", tokens_per_frame, 1), offset_arg(offset, where, 0))


# ---------------------------------------------------------------------- packed multi-stream patterns


@dataclass(frozen=True)
class MixedAttention(IntervalMask):
    """MixFormer's asymmetric mixed attention over ``[template (Nz); search]``: template rows see the
    template only, search rows see everything (``symmetric``: every row sees everything)."""

    num_template: int
    symmetric: bool = False
    offset: int = 0

    def __repr__(self) -> str:
        sym = ", symmetric=True" if self.symmetric else ""
        return f"mixed_attention({self.num_template}{sym}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        if self.symmetric:
            return torch.ones_like(q_idx + kv_idx, dtype=torch.bool)
        return (q_idx + self.offset >= self.num_template) | (kv_idx < self.num_template)

    def intervals(self, nq, nk):
        p = torch.arange(nq) + self.offset
        hi = torch.where((p < self.num_template) & (not self.symmetric), self.num_template - 1, nk - 1)
        return interval(torch.zeros_like(p), hi)


def mixed_attention(num_template: int, *, symmetric: bool = False, offset: int = 0) -> MixedAttention:
    """MixFormer's mixed attention mask ("MixFormer: End-to-End Tracking with Iterative Mixed Attention",
    arXiv 2203.11082, §3.2) on the packed sequence ``[template tokens; search tokens]``.

    Template rows (positions ``< num_template``) attend to template keys only, so template features
    never depend on the search region (and can be cached across frames); search rows attend to all.
    ``symmetric=True`` is full attention over the concatenation.
    """
    where = "mixed_attention"
    return MixedAttention(int_arg(f"{where}: num_template", num_template, 0), bool(symmetric),
                          offset_arg(offset, where, 0))


@dataclass(frozen=True)
class Composite(IntervalMask):
    """EE-MLLM's composite attention over ``[visual (Nv); text]``: visual rows see themselves only,
    text rows are causal over everything before them."""

    num_visual: int
    offset: int = 0

    def __repr__(self) -> str:
        return f"composite({self.num_visual}{_offset_repr(self.offset)})"

    def mask_mod(self, b, h, q_idx, kv_idx):
        p = q_idx + self.offset
        return torch.where(p < self.num_visual, kv_idx == p, kv_idx <= p)

    def intervals(self, nq, nk):
        p = torch.arange(nq) + self.offset
        return interval(torch.where(p < self.num_visual, p, 0), p)


def composite(num_visual: int, *, offset: int = 0) -> Composite:
    """EE-MLLM's composite attention mask ("EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large
    Language Model", arXiv 2408.11795, §3.2) on ``[visual tokens; text tokens]``: no attention among
    visual tokens (each sees only itself), causal attention for the text over visual and text tokens.
    Query row ``i`` is at position ``i + offset``.
    """
    return Composite(int_arg("composite: num_visual", num_visual, 0), offset_arg(offset, "composite", 0))


@dataclass(frozen=True)
class FirstFrame(IntervalMask):
    """VideoBooth's cross-frame pattern over keys ``[prompt (Ni); frame 0; frame 1; ...]`` (``P`` tokens a frame):
    frame 0's rows see the prompt and frame 0, frame ``t``'s rows see frame 0 and frame ``t``."""

    num_prompt: int
    tokens_per_frame: int
    offset: int = 0

    arity = 2

    def __repr__(self) -> str:
        return f"first_frame(prompt={self.num_prompt}, P={self.tokens_per_frame}{_offset_repr(self.offset)})"

    def validate(self, nq, nk):
        super().validate(nq, nk)
        if nk < self.num_prompt + self.offset + nq:
            raise ValueError(f"{self!r}: the keys must be [prompt ({self.num_prompt}); the frames of the query rows "
                             f"0..{self.offset + nq - 1}], at least {self.num_prompt + self.offset + nq}, got Nk={nk}")

    def mask_mod(self, b, h, q_idx, kv_idx):
        f = (q_idx + self.offset) // self.tokens_per_frame
        ni, p = self.num_prompt, self.tokens_per_frame
        first = (kv_idx >= torch.where(f == 0, 0, ni)) & (kv_idx < ni + p)
        own = (kv_idx >= ni + f * p) & (kv_idx < ni + (f + 1) * p) & (f > 0)
        return first | own

    def intervals(self, nq, nk):
        f = (torch.arange(nq) + self.offset) // self.tokens_per_frame
        ni, p = self.num_prompt, self.tokens_per_frame
        lo1, hi1 = torch.where(f == 0, 0, ni), torch.full_like(f, ni + p - 1)
        lo2 = torch.where(f == 0, nk, ni + f * p)                                    # empty for frame 0
        return torch.stack([lo1, lo2]), torch.stack([hi1, ni + (f + 1) * p - 1])


def first_frame(num_prompt: int, tokens_per_frame: int, *, offset: int = 0) -> FirstFrame:
    """VideoBooth's cross-frame attention with image-prompt keys ("VideoBooth: Diffusion-based Video Generation
    with Image Prompts", arXiv 2312.00777, §3.3): queries are the frames' tokens (frame-major, ``P`` a frame),
    keys are ``[prompt tokens (Ni); the same frames]``. Frame 0 attends to the prompt and itself; every later
    frame to frame 0 and itself, so the prompt reaches later frames only through frame 0.
    """
    where = "first_frame"
    return FirstFrame(int_arg(f"{where}: num_prompt", num_prompt, 0),
                      int_arg(f"{where}: tokens_per_frame", tokens_per_frame, 1), offset_arg(offset, where, 0))


__all__ = ["causal_cross", "composite", "first_frame", "frame_causal", "key_padding", "mixed_attention", "varlen_cross"]
