"""Combiner: Full Attention Transformer with Sparse Computation Cost (arXiv 2107.05768) — Combiner-Fixed.

Section 4.1 of the paper: the sequence is cut into segments of ``s`` tokens. A query attends its own
segment directly and every other segment (every earlier one when causal) through one *summary* token
whose key is the max-pool of the segment's keys and whose value is the segment's own attention
``sum_j softmax_j(q_R . k_j) v_j`` with ``q_R`` the max-pool of its queries: ``p(j | i) ~ p(R | i) q(j | R)``.
Every key keeps a non-zero weight (full attention) at ``O(N (s + N / s) D)`` cost, ``O(N sqrt N D)`` for
``s ~ sqrt N``; one softmax runs over direct keys and summaries.

Backends:
* ``tiles`` (automatic where the compiled tile kernel runs: CPU, float32 / bfloat16 / float16, training or
  inference): the factorisation is exactly softmax attention of every query over the concatenated keys
  ``[k_1..k_N, kR_1..kR_n]`` with values ``[v_1..v_N, vR_1..vR_n]`` (the summary's ``p(R | i)`` is a plain
  score ``q_i . kR``, no log-weight term), each row allowing its own segment (up to itself when causal) and
  the other (earlier) segments' summaries: at most three key intervals per row. That pattern becomes a tile
  list of the FlashAttention-2 kernel (arXiv 2307.08691): in-segment tiles FULL, diagonal and summary
  tiles PARTIAL with bitmasks, everything else skipped, so causal runs only the lower part of each
  diagonal segment, one online softmax replaces the merge, and the kernel's backward serves training.
  Measured at N=16384, s=128, B=1, H=8, D=64, float32, 2 threads (busy shared machine, medians), it was the
  fastest backend in every case: forward 0.85 s non-causal (merged 0.99, segmented 1.08) and 0.71 s causal
  (merged 1.20, segmented 1.15). The kernel appends the summaries to K, V itself (``extra_kv``: no
  concatenated copies), and in float32 inference the summaries come from one compiled pass over q, k, v
  (``kernels/native/combiner_cpu.cpp``) instead of two max-pools and an attention call. Quiet, in the
  ``sequence`` benchmark: forward 67.6 ms non-causal (55% of the 64x density ideal vs dense SDPA's 2.38 s),
  61.3 ms causal.
* ``merged`` (automatic for float32 CPU inference when the tile kernel is unavailable: no input needs a
  gradient, ``N`` a multiple of ``s``, ``Dv == D``, a positive scale): the direct part runs as one fused
  flash call with the segments as batch (causal inside each segment), the summary part as a second fused
  call of all queries against the ``N / s`` summaries under a small additive mask (causal: in query chunks,
  so the skipped triangle is mostly not computed), and the two are merged exactly by their log-sum-exps
  (FlashAttention-2, arXiv 2307.08691, the same rescaling as its online softmax). Two large fused calls and
  no gathered key copies; the fused op computes whole tiles of each diagonal segment even when causal.
* ``segmented`` (automatic otherwise: float64, no compiled kernel, other devices): one ``ak.attention``
  call with the segments as batch: each segment's queries against its ``s`` keys followed by the other
  segments' summaries (gathered, so the non-causal, evenly divided case needs no mask and runs on the fused
  kernel; causal or a ragged tail adds a bool mask).
* ``reference``: :func:`~attnkit.reference.naive_sequence2.naive_combiner`, one query at a time.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from attnkit._validate import assert_finite, check_qkv, resolve_scale
from attnkit.kernels import native as _native
from attnkit.kernels.flash import TileList, flash_attention, native_reason, tile_list_from
from attnkit.kernels.fused import fused_check, fused_ops
from attnkit.masks.base import EMPTY, FULL, PARTIAL
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence2 import naive_combiner


@dataclass(frozen=True, eq=False)
class CombinerCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    segment: int
    causal: bool
    scale: float

    def describe(self) -> str:
        B, N, H, D = self.q.shape
        return (f"q {(B, N, H, D)} {self.q.dtype}, segment {self.segment} ({math.ceil(N / self.segment)} "
                f"segment(s)), {'causal' if self.causal else 'non-causal'}")


def make_call(q, k, v, *, segment, causal=False, scale=None) -> CombinerCall:
    try:
        check_qkv(q, k, v, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"combiner_attention: {e}") from None
    if k.shape[1] != q.shape[1] or k.shape[2] != q.shape[2]:
        raise ValueError(f"combiner_attention: self-attention needs k with q's (N, H) = {tuple(q.shape[1:3])}, "
                         f"got {tuple(k.shape[1:3])}")
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ValueError(f"combiner_attention: segment must be a positive int, got {segment!r}")
    assert_finite("combiner_attention", q=q, k=k, v=v)  # only under the debug switch (the merged path's fused
    # calls do not go through ak.attention's check)
    return CombinerCall(q, k, v, segment, bool(causal), resolve_scale(scale, q.shape[-1]))


def _segment_views(c: CombinerCall):
    """``(q, scale, Q, K, V, valid)``: ``q`` pre-scaled with ``scale = 1`` when the scale is non-positive (max
    does not commute with it), ``Q, K, V (B, n, s, H, .)`` the segments of q, k, v (zero-padded to ``n s``
    tokens when ``s`` does not divide ``N``), ``valid (n, s)`` the real tokens."""
    B, N, H = c.q.shape[:3]
    s = min(c.segment, N)
    n = -(-N // s)
    pad = n * s - N
    # max-pool commutes with the positive scale: pool unscaled q, scale the small summary query and let the
    # attention call scale the direct scores (one multiply over q saved)
    q, sc = c.q, c.scale
    if sc <= 0:  # a non-positive scale does not commute with max: scale first, as the paper
        q, sc = q * sc, 1.0
    qp, kp, vp = q, c.k, c.v
    if pad:
        qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (qp, kp, vp))  # (B, n s, H, .)
    Q, K, V = (t.view(B, n, s, H, t.shape[-1]) for t in (qp, kp, vp))  # (B, n, s, H, .)
    valid = (torch.arange(n * s, device=q.device) < N).view(n, s)  # (n, s)
    return q, sc, Q, K, V, valid


def _summaries(c: CombinerCall, views=None) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, kR (B, n, H, D), vR (B, n, H, Dv), valid (n, s))`` with ``n = ceil(N / s)``: the
    summary keys (max-pool) and values (the max-pooled query's attention over its segment); ``q`` and
    ``scale`` as :func:`_segment_views` (whose result ``views`` may be passed in)."""
    q, sc, Q, K, V, valid = views if views is not None else _segment_views(c)
    B, n, s, H, D = Q.shape
    Dv = V.shape[-1]
    if n * s != c.q.shape[1]:  # pads never win a max-pool and get no weight inside a summary
        neg = torch.finfo(q.dtype).min
        qR = Q.masked_fill(~valid[None, :, :, None, None], neg).amax(2)  # (B, n, H, D)
        kR = K.masked_fill(~valid[None, :, :, None, None], neg).amax(2)  # (B, n, H, D)
        logit = torch.einsum("bnhd,bnjhd->bnhj", qR * sc, K)  # (B, n, H, s)
        logit = logit.masked_fill(~valid[None, :, None, :], float("-inf"))
        vR = torch.einsum("bnhj,bnjhd->bnhd", torch.softmax(logit, -1), V)  # (B, n, H, Dv)
    elif _one_pass_summaries(c):  # inference, float32: one pass over q, k, v (kernels/native/combiner_cpu.cpp)
        kR, vR = _native.ops().combiner_summaries(q, c.k, c.v, s, sc)  # (B, n, H, D), (B, n, H, Dv)
    else:  # the summary value is one query's attention over its segment: the fused kernel, no permuted copies
        qR, kR = Q.amax(2), K.amax(2)  # (B, n, H, D)
        vR = attention(qR.reshape(B * n, 1, H, D), K.reshape(B * n, s, H, D), V.reshape(B * n, s, H, Dv),
                       scale=sc).view(B, n, H, Dv)  # (B, n, H, Dv)
    return q, sc, kR, vR, valid


def _one_pass_summaries(c: CombinerCall) -> bool:
    """The compiled one-pass summaries run: ``s`` divides ``N``, float32 CPU inputs with contiguous features,
    no gradient needed, and the native kernels built (the torch form otherwise; both follow the same IEEE
    semantics)."""
    N = c.q.shape[1]
    if N % min(c.segment, N):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (c.q, c.k, c.v)):
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in (c.q, c.k, c.v)):
        return False
    return native_reason(c.q) is None


def _segmented(c: CombinerCall) -> torch.Tensor:
    B, N, H, D = c.q.shape
    Dv = c.v.shape[-1]
    s = min(c.segment, N)
    n = -(-N // s)
    pad = n * s - N
    views = _segment_views(c)  # padded once, for the summaries and the segments alike
    q, sc, kR, vR, valid = _summaries(c, views)
    Q, K, V = views[2:5]  # (B, n, s, H, .)
    dev = q.device
    if not c.causal and not pad:
        # the other segments' summaries, gathered per segment: no mask, the fused path
        other = torch.arange(n - 1, device=dev).unsqueeze(0).expand(n, n - 1)  # (n, n-1)
        other = other + (other >= torch.arange(n, device=dev)[:, None]).long()  # skip the own segment
        keys = torch.cat([K, kR[:, other]], 2)  # (B, n, s + n - 1, H, D)
        vals = torch.cat([V, vR[:, other]], 2)  # (B, n, s + n - 1, H, Dv)
        mask = None
    else:
        keys = torch.cat([K, kR.unsqueeze(1).expand(B, n, n, H, D)], 2)  # (B, n, s + n, H, D)
        vals = torch.cat([V, vR.unsqueeze(1).expand(B, n, n, H, Dv)], 2)  # (B, n, s + n, H, Dv)
        seg = torch.arange(n, device=dev)
        local = valid[:, None, :].expand(n, s, s)  # (n, s, s): key j of the own segment
        if c.causal:
            local = local & torch.ones(s, s, dtype=torch.bool, device=dev).tril()
            far = seg[None, :] < seg[:, None]  # (n, n): summaries of earlier segments
        else:
            far = seg[None, :] != seg[:, None]
        mask = torch.cat([local, far[:, None, :].expand(n, s, n)], -1)  # (n, s, s + n)
        mask = mask.unsqueeze(1).repeat(B, 1, 1, 1)  # (B n, 1, s, s + n)
    if q.device.type == "meta":  # shapes only: the bool mask's emptiness check needs values
        mask = None
    M = keys.shape[2]
    o = attention(Q.reshape(B * n, s, H, D), keys.reshape(B * n, M, H, D), vals.reshape(B * n, M, H, Dv),
                  mask, scale=sc)  # (B n, s, H, Dv)
    return o.reshape(B, n * s, H, Dv)[:, :N]  # (B, N, H, Dv)


_TILE_BQ, _TILE_BK = 64, 64  # kernel tiles (64 keys: one bitmask word per row, the kernel's micro-kernel)


def _row_intervals(N: int, s: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo, hi (N, 3)``: the key intervals of each query over ``[keys (N), summaries (n)]``: its own
    segment (up to itself when causal), then the summaries before and (non-causal) after its own."""
    n = -(-N // s)
    i = torch.arange(N)
    a = i // s  # (N,) segment of each query
    lo0, hi0 = a * s, (i + 1) if causal else torch.clamp((a + 1) * s, max=N)
    lo1, hi1 = torch.full_like(i, N), N + a
    lo2, hi2 = (torch.full_like(i, N), torch.full_like(i, N)) if causal else (N + a + 1, torch.full_like(i, N + n))
    return torch.stack([lo0, lo1, lo2], 1), torch.stack([hi0, hi1, hi2], 1)  # (N, 3) each


@lru_cache(maxsize=16)
def combiner_tile_list(N: int, s: int, causal: bool, bq: int = _TILE_BQ, bk: int = _TILE_BK) -> TileList:
    """The tile list of Combiner-Fixed over ``N`` queries and ``N + ceil(N / s)`` keys ``[keys, summaries]``
    (cached): per tile, the allowed pairs are counted from the row intervals (FULL when every valid pair
    is allowed, EMPTY when none), and only PARTIAL tiles get their bitmask evaluated."""
    n = -(-N // s)
    nk = N + n
    lo, hi = _row_intervals(N, s, causal)  # (N, 3)
    nqt, nkt = -(-N // bq), -(-nk // bk)
    k0 = torch.arange(nkt) * bk
    k1 = torch.clamp(k0 + bk, max=nk)  # (nkt,) key tile bounds
    cnt = torch.zeros(nqt * bq, nkt, dtype=torch.int32)
    for j in range(3):  # the intervals are disjoint: overlaps add up
        cnt[:N] += (torch.minimum(hi[:, j, None], k1) - torch.maximum(lo[:, j, None], k0)).clamp_min(0).int()
    cnt = cnt.view(nqt, bq, nkt).sum(1)  # (nqt, nkt) allowed pairs per tile
    rows = torch.clamp(torch.arange(nqt) * bq + bq, max=N) - torch.arange(nqt) * bq  # (nqt,)
    area = rows[:, None] * (k1 - k0)[None]  # (nqt, nkt) valid pairs per tile
    cls = torch.where(cnt == 0, EMPTY, torch.where(cnt == area, FULL, PARTIAL)).to(torch.int8)
    ti, tj = (cls == PARTIAL).nonzero(as_tuple=True)
    qi = ti[:, None] * bq + torch.arange(bq)  # (P, bq)
    kj = (tj[:, None] * bk + torch.arange(bk))[:, None, :, None]  # (P, 1, bk, 1)
    lq, hq = lo[qi.clamp_max(N - 1)][:, :, None], hi[qi.clamp_max(N - 1)][:, :, None]  # (P, bq, 1, 3)
    allowed = ((kj >= lq) & (kj < hq)).any(-1) & (qi < N)[:, :, None]  # (P, bq, bk); keys >= nk are in no interval
    return tile_list_from(cls, allowed, bq, bk, int(((cls != EMPTY).long() * area).sum()))


def _tiles_supports(c: CombinerCall) -> tuple[bool, str]:
    why = native_reason(c.q, build=False)
    if why is not None:
        return False, f"compiled tile kernel not usable: {why}"
    return True, ""


def _tiles_detail(c: CombinerCall) -> str:
    N = c.q.shape[1]
    s = min(c.segment, N)
    n = -(-N // s)
    one_pass = _one_pass_summaries(c)
    summaries = ("summaries in one compiled pass over q, k, v (inference, float32)" if one_pass else
                 "summaries by max-pools and one attention call (torch form: gradients, other dtypes or a ragged "
                 "last segment)")
    return (f"one tile-kernel call, {N} queries over {N} keys + {n} summaries appended in the kernel "
            f"({'causal diagonal tiles cut by bitmasks' if c.causal else 'own-segment summary masked'}); "
            f"{summaries}; first "
            "because it was the fastest backend measured (N=16384, s=128, 2 threads: fwd 0.85 s vs merged 0.99 s "
            "non-causal, 0.71 s vs 1.20 s causal; fwd+bwd 2.9 s vs segmented 3.6 s non-causal, 2.6 s vs 3.7 s "
            "causal)")


def _tiles(c: CombinerCall) -> torch.Tensor:
    N = c.q.shape[1]
    s = min(c.segment, N)
    if native_reason(c.q) is not None:  # the build failed on this first use: the exact torch path
        return _segmented(c)
    q, sc, kR, vR, _ = _summaries(c)
    # one key list [keys, summaries]: the kernel's single online softmax covers both parts. The kernel appends
    # the summaries itself, in the heads-first copy of K / V it makes anyway (a torch.cat here wrote two more
    # fresh (B, N + n, H, D) buffers per call)
    return flash_attention(q, c.k, c.v, combiner_tile_list(N, s, c.causal), sc, extra_kv=(kR, vR))[0]  # (B, N, H, Dv)


_CAUSAL_CHUNKS = 8  # query chunks of the causal summary part: each computes its own summary prefix only


def _merged_supports(c: CombinerCall) -> tuple[bool, str]:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (c.q, c.k, c.v)):
        return False, "an input needs a gradient (the fused op's backward takes no log-sum-exp gradient)"
    if c.q.dtype != torch.float32:
        return False, f"float32 only (the merge of the two parts stays in the input dtype), got {c.q.dtype}"
    ok, why = fused_check(c.q, c.v)
    if not ok:
        return False, why
    if c.q.shape[1] % min(c.segment, c.q.shape[1]):
        return False, f"N={c.q.shape[1]} is not a multiple of the segment {c.segment}"
    if c.scale <= 0:
        return False, f"needs a positive scale (max-pool commutes with it), got {c.scale}"
    return True, ""


def _merge_into(tgt: torch.Tensor, la: torch.Tensor, ob: torch.Tensor, lb: torch.Tensor) -> None:
    """``tgt (B, n, H, Dv)`` with lse ``la (B, n, H)`` := its exact softmax merge with ``(ob, lb)``, in place.

    Both parts have at least one key per row here, so both lse are finite and no empty-row guard is needed;
    the weights are formed on the small ``(B, n, H)`` lse tensors and the big ones are touched twice.
    """
    top = torch.maximum(la, lb)  # (B, n, H)
    wa, wb = torch.exp(la - top), torch.exp(lb - top)
    den = wa + wb
    tgt.mul_((wa / den).unsqueeze(-1)).addcmul_(ob, (wb / den).unsqueeze(-1))


def _merged(c: CombinerCall) -> torch.Tensor:
    fwd, _ = fused_ops()
    B, N, H = c.q.shape[:3]
    s = min(c.segment, N)
    n = N // s
    sc = c.scale
    # segments as batch: (B n, H, s, D) strided views of the (B, N, H, D) inputs, no copies
    Q, K, V = (t.reshape(B * n, s, H, t.shape[-1]).transpose(1, 2) for t in (c.q, c.k, c.v))  # (B n, H, s, .)
    o_loc, l_loc = fwd(Q, K, V, 0.0, c.causal, scale=sc)  # (B n, H, s, Dv), (B n, H, s)
    o_loc = o_loc.transpose(1, 2).reshape(B, N, H, -1)  # (B, N, H, Dv): the op's memory is already this layout
    if n == 1:
        return o_loc
    l_loc = l_loc.view(B, n, H, s).transpose(2, 3).reshape(B, N, H)  # (B, N, H)
    _, _, kR, vR, _ = _summaries(c)  # (B, n, H, D), (B, n, H, Dv)
    seg = torch.arange(n, device=c.q.device)
    if c.causal:  # segment r sees summaries 0..r-1; segment 0 has none and keeps its direct part
        bounds = torch.linspace(1, n, min(_CAUSAL_CHUNKS, n - 1) + 1).round().long().tolist()
        parts = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    else:
        parts = [(0, n)]
    for a, b in parts:
        nk = b - 1 if c.causal else n  # summaries this chunk of segments can see at most
        allowed = (seg[None, :nk] < seg[a:b, None]) if c.causal else (seg[None, :nk] != seg[a:b, None])  # (b-a, nk)
        bias = torch.zeros(b - a, nk, dtype=c.q.dtype, device=c.q.device).masked_fill_(~allowed, float("-inf"))
        bias = bias.repeat_interleave(s, 0)  # (queries of the chunk, nk)
        qa = c.q[:, a * s:b * s].transpose(1, 2)  # (B, H, (b-a) s, D)
        o_sum, l_sum = fwd(qa, kR[:, :nk].transpose(1, 2), vR[:, :nk].transpose(1, 2), 0.0, False,
                           attn_mask=bias, scale=sc)  # (B, H, (b-a) s, Dv), (B, H, (b-a) s)
        _merge_into(o_loc[:, a * s:b * s], l_loc[:, a * s:b * s], o_sum.transpose(1, 2), l_sum.transpose(1, 2))
    return o_loc


def _reference(c: CombinerCall) -> torch.Tensor:
    return naive_combiner(c.q, c.k, c.v, segment=c.segment, causal=c.causal, scale=c.scale)


DISPATCHER = Dispatcher("combiner_attention", [
    Backend("tiles", _tiles, supports=_tiles_supports, detail=_tiles_detail,
            note="one tile-kernel call over [keys, summaries]: only the allowed tiles (causal: the lower part of "
                 "each diagonal segment), one online softmax, kernel backward; fastest measured at N=16384, "
                 "fwd and fwd+bwd, causal and not"),
    Backend("merged", _merged, supports=_merged_supports,
            note="fused direct part (segments as batch) + fused summary part, merged by log-sum-exp"),
    Backend("segmented", _segmented, note="segments as batch: own keys + other segments' summaries, ak.attention"),
    Backend("reference", _reference, auto=False, note="naive_combiner: one query at a time"),
])
register_op("combiner_attention", make_call, DISPATCHER)


def combiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment: int, causal: bool = False,
                       scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Combiner-Fixed self-attention: direct attention inside segments, summaries across them.

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)``.
        segment: ``s``, the segment length (``sqrt(N)`` balances the two parts; ``s = N`` or ``s = 1`` is
            exact full attention). A last segment shorter than ``s`` is allowed.
        causal: own segment up to the query, summaries of earlier segments only.
        scale: score scale (default ``1 / sqrt(D)``), applied to ``q`` before the max-pool.
        backend: None, ``"tiles"`` (compiled CPU tile kernel), ``"merged"`` (float32 CPU inference),
            ``"segmented"`` or ``"reference"``.

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 4, 32)
        >>> o = combiner_attention(q, k, v, segment=32)
    """
    return DISPATCHER.run(make_call(q, k, v, segment=segment, causal=causal, scale=scale), backend)


def combiner_density(n: int, segment: int, causal: bool = False) -> float:
    """Score pairs computed (direct + summary logits + summary pooling) over the dense area (``N^2``, or
    ``N (N + 1) / 2`` causal): ``1 / density`` is the ideal speedup over dense attention."""
    s = min(segment, n)
    m = -(-n // s)
    if causal:
        pairs = m * s * (s + 1) / 2 + s * m * (m - 1) / 2 + n
        return pairs / (n * (n + 1) / 2)
    return (n * (s + m - 1) + n) / (n * n)
