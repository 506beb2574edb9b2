"""Softmax attention over a list of tiles with the compiled CPU kernel (``kernels/native/flash_tiles_cpu.cpp``).

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", arXiv 2307.08691
(Algorithms 1 and 2), run only on the (query tile, key tile) pairs a mask leaves non-empty.

A :class:`TileList` is what the kernel walks: per query tile, its non-empty key tiles in order, each FULL
(no masking) or PARTIAL with a per-tile bitmask. It is built once per (mask, Nq, Nk, tile sizes) from
``mask.blocks`` and the mask evaluated on the partial tiles only, and cached. Other engines can hand the
kernel their own lists (:func:`tile_list_from`): the CSR rows may differ per batch and KV head
(``row_ptr (Lb, Lh, nqt + 1)``) and the bitmasks per batch and query head (``bits (Bm, Hm, nslots, bq, words)``).

:func:`flash_attention` is differentiable: the backward (dQ, dK, dV from the saved log-sum-exp, and the
gradient of the returned lse when it is used) runs in the same kernel with a deterministic dK/dV sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from attnkit.kernels import native as _native
from attnkit.masks.base import EMPTY, PARTIAL, Mask

#: dtypes the kernel takes (computed in float32); float64 stays on the exact torch path
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: keys one GEMM of the kernel covers at most (consecutive key tiles are merged up to this)
SPAN = 512
_EVAL_CHUNK = 1 << 22  # predicate evaluations per batch while building bitmasks


@dataclass(frozen=True, eq=False)
class TileList:
    """The entries the kernel visits (see the module docstring). ``computed_pairs``: query-key pairs it
    computes per (batch, head) (useful + masked-out ones in partial tiles)."""

    bq: int
    bk: int
    row_ptr: torch.Tensor  # int64 (Lb, Lh, nqt + 1)
    cols: torch.Tensor     # int64 (E,) key tile of each entry, ascending within a query tile
    slots: torch.Tensor    # int64 (E,) -1 for FULL, else the entry's bitmask in ``bits``
    bits: torch.Tensor     # int64 (Bm, Hm, nslots, bq, ceil(bk / 64)); bit c of word w = key 64 w + c
    computed_pairs: int


def tile_sizes(nq: int, nk: int, groups: int = 1) -> tuple[int, int]:
    """``(bq, bk)``: 64-key tiles (one bitmask word per row); 64 query rows per head, 32 when four or more
    query heads share a KV head (their rows are stacked into one taller GEMM)."""
    return min(64 if groups < 4 else 32, nq), 64


def pack_bits(allowed: torch.Tensor, bk: int) -> torch.Tensor:
    """Bool ``(..., bq, w <= bk)`` -> int64 ``(..., bq, ceil(bk / 64))`` (bit c of word j = column 64 j + c)."""
    words = -(-bk // 64)
    pad = words * 64 - allowed.shape[-1]
    if pad:
        allowed = torch.nn.functional.pad(allowed, (0, pad))
    # eight columns per byte, eight bytes per word read little-endian (the kernel's layout): one byte per
    # input element in flight instead of an int64 per element
    by = allowed.contiguous().view(torch.uint8).view(*allowed.shape[:-1], words * 8, 8)  # (..., bq, 8 words, 8)
    by = by << torch.arange(8, dtype=torch.uint8)
    return by.sum(-1, dtype=torch.uint8).view(torch.int64)  # (..., bq, words)


def tile_entries(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR entries of tile classes ``(Lb, Lh, nqt, nkt)``: ``row_ptr (Lb, Lh, nqt + 1)`` into one entry array
    (each list starts where the previous one ended) and, per entry, its list, query tile and key tile
    (``lead, ti, tj``, the non-EMPTY tiles in row-major order)."""
    lb, lh, nqt = classes.shape[:3]
    lead, ti, tj = (classes != EMPTY).view(lb * lh, nqt, -1).nonzero(as_tuple=True)
    counts = torch.bincount(lead * nqt + ti, minlength=lb * lh * nqt)
    ptr = torch.zeros(lb * lh * nqt + 1, dtype=torch.long)
    ptr[1:] = counts.cumsum(0)
    row_ptr = torch.cat([ptr[:-1].view(lb * lh, nqt), ptr[1:].view(lb * lh, nqt)[:, -1:]], 1)  # (Lb*Lh, nqt + 1)
    return row_ptr.view(lb, lh, nqt + 1), lead, ti, tj


def tile_list_from(classes: torch.Tensor, allowed: torch.Tensor | None, bq: int, bk: int,
                   computed_pairs: int = 0) -> TileList:
    """A tile list from tile classes ``(nqt, nkt)`` or ``(Lb, Lh, nqt, nkt)`` (one list per batch / KV head;
    0 EMPTY, 1 PARTIAL, 2 FULL) and the partial tiles' bool masks in row-major order of ``classes``,
    ``(P, bq, bk)`` or ``(Bm, Hm, P, bq, bk)`` (False outside the tensor)."""
    c4 = classes if classes.dim() == 4 else classes[None, None]                  # (Lb, Lh, nqt, nkt)
    lb, lh, nqt = c4.shape[:3]
    row_ptr, lead, ti, tj = tile_entries(c4)
    partial = c4.view(lb * lh, nqt, -1)[lead, ti, tj] == PARTIAL
    slots = torch.full((ti.numel(),), -1, dtype=torch.long)
    if allowed is None or allowed.shape[-3] == 0:
        bits = torch.zeros(1, 1, 1, bq, -(-bk // 64), dtype=torch.long)
    else:
        a5 = allowed if allowed.dim() == 5 else allowed[None, None]          # (Bm, Hm, P, bq, bk)
        packed = pack_bits(a5, bk)                                             # (Bm, Hm, P, bq, words)
        bm, hm, p = packed.shape[:3]
        flat = packed.permute(2, 0, 1, 3, 4).reshape(p, -1)                    # (P, Bm*Hm*bq*words)
        uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)        # identical tiles share a slot
        bits = uniq.view(-1, bm, hm, bq, packed.shape[-1]).permute(1, 2, 0, 3, 4).contiguous()
        slots[partial] = inverse
    return TileList(bq, bk, row_ptr, tj.long().contiguous(), slots, bits, computed_pairs)


def tile_list(mask: Mask | None, nq: int, nk: int, bq: int, bk: int, hkv: int | None = None) -> TileList:
    """The (cached) tile list of ``mask`` for ``nq`` queries and ``nk`` keys.

    A head-dependent mask with exact per-head tile classes (``mask.head_blocks``, e.g. ``qk_sparse``) gets
    one list per (batch, head) when its heads are the KV heads (``hkv`` given and equal), so each head walks
    only its own tiles; otherwise every head walks the union and masks inside it.
    """
    if mask is not None and hkv is not None and hasattr(mask, "head_blocks") and mask.lead_shape[1] in (1, hkv):
        return _head_tile_list_cached(mask, nq, nk, bq, bk)
    return _tile_list_cached(mask, nq, nk, bq, bk)


@lru_cache(maxsize=16)
def _head_tile_list_cached(mask: Mask, nq: int, nk: int, bq: int, bk: int) -> TileList:
    cls = mask.head_blocks(nq, nk, bq, bk)                                      # (Lb, Lh, nqt, nkt)
    lb, lh, nqt, nkt = cls.shape
    rows = torch.clamp(torch.arange(nqt) * bq + bq, max=nq) - torch.arange(nqt) * bq
    cols = torch.clamp(torch.arange(nkt) * bk + bk, max=nk) - torch.arange(nkt) * bk
    computed = round(((cls != EMPTY).long() * rows[:, None] * cols[None, :]).sum().item() / (lb * lh))
    lead, ti, tj = (cls == PARTIAL).view(lb * lh, nqt, nkt).nonzero(as_tuple=True)
    allowed = None
    if ti.numel():
        q = ti[:, None] * bq + torch.arange(bq)[None]                            # (P, bq)
        kv = tj[:, None] * bk + torch.arange(bk)[None]                           # (P, bk)
        valid = (q < nq)[:, :, None] & (kv < nk)[:, None, :]
        ok = mask._evaluate(q.clamp_max(nq - 1)[:, :, None], kv.clamp_max(nk - 1)[:, None, :], nq, nk)
        ok = ok.expand(lb, lh, *ok.shape[2:]).reshape(lb * lh, *ok.shape[2:])     # (Lb*Lh, P, bq, bk)
        allowed = ok[lead, torch.arange(lead.numel())] & valid                   # each tile under its own head
    return tile_list_from(cls, allowed, bq, bk, computed)


@lru_cache(maxsize=64)
def _tile_list_cached(mask: Mask | None, nq: int, nk: int, bq: int, bk: int) -> TileList:
    nqt, nkt = -(-nq // bq), -(-nk // bk)
    if mask is None:
        cls = torch.full((nqt, nkt), 2, dtype=torch.int8)
    else:
        cls = mask.blocks(nq, nk, bq, bk)
    rows = torch.clamp(torch.arange(nqt) * bq + bq, max=nq) - torch.arange(nqt) * bq
    cols = torch.clamp(torch.arange(nkt) * bk + bk, max=nk) - torch.arange(nkt) * bk
    computed = int(((cls != EMPTY).long() * rows[:, None] * cols[None, :]).sum())
    ti, tj = (cls == PARTIAL).nonzero(as_tuple=True)
    allowed = None
    if ti.numel():
        parts = []
        dq, dk = torch.arange(bq), torch.arange(bk)
        per = max(1, _EVAL_CHUNK // (bq * bk))
        for s in range(0, ti.numel(), per):
            i, j = ti[s:s + per], tj[s:s + per]
            q = i[:, None] * bq + dq[None]                                     # (P, bq)
            kv = j[:, None] * bk + dk[None]                                    # (P, bk)
            valid = (q < nq)[:, :, None] & (kv < nk)[:, None, :]               # (P, bq, bk)
            ok = mask._evaluate(q.clamp_max(nq - 1)[:, :, None], kv.clamp_max(nk - 1)[:, None, :], nq, nk)
            parts.append(ok & valid)                                           # (P, bq, bk) or (B, H, P, bq, bk)
        allowed = torch.cat(parts, dim=-3)
    return tile_list_from(cls, allowed, bq, bk, computed)


def native_reason(q: torch.Tensor, build: bool = True) -> str | None:
    """None when the compiled tile kernel takes ``q``'s device and dtype, else why not.

    ``build=False`` never triggers the build (for ``explain``): an unbuilt kernel counts as usable.
    """
    if q.device.type != "cpu":
        return f"inputs on {q.device.type}"
    if q.dtype not in KERNEL_DTYPES:
        return f"{q.dtype} runs the exact torch path (the kernel computes in float32)"
    if build:
        _native.available()
    st = _native.status()
    return None if st in ("loaded", _native.NOT_BUILT) else f"native kernel {st}"


def _splits(batch: int, hkv: int) -> int:
    """Query ranges per (batch, KV head) in the backward: enough tasks for every thread, else 1 (no extra
    dK/dV accumulators)."""
    tasks, want = batch * hkv, 2 * torch.get_num_threads()
    return 1 if tasks >= want else -(-want // tasks)


def _feature_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tl: TileList, scale: float, k2=None, v2=None):
        out, lse = _native.ops().flash_tiles_fwd(q, k, v, tl.row_ptr, tl.cols, tl.slots, tl.bits, tl.bq, tl.bk,
                                                 scale, SPAN, k2, v2)
        ctx.save_for_backward(q, k, v, out, lse, k2, v2)
        ctx.tl, ctx.scale = tl, scale
        ctx.set_materialize_grads(False)  # dlse stays None unless the caller differentiates the lse
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, k2, v2 = ctx.saved_tensors
        tl = ctx.tl
        dout = torch.zeros_like(out) if dout is None else _feature_contiguous(dout.to(out.dtype))
        dlse = lse.new_empty(0) if dlse is None else dlse.float().expand_as(lse).contiguous()
        if dlse.numel() and dlse.stride() != lse.stride():
            dlse = dlse.as_strided(lse.shape, lse.stride()).copy_(dlse)  # same layout as lse
        dq, dk, dv = _native.ops().flash_tiles_bwd(q, k, v, out, dout, lse, dlse, tl.row_ptr, tl.cols, tl.slots,
                                                   tl.bits, tl.bq, tl.bk, ctx.scale, SPAN,
                                                   _splits(q.shape[0], k.shape[2]), k2, v2)
        if k2 is None:
            return dq, dk, dv, None, None, None, None
        n = k.shape[1]  # the kernel's gradients cover [k, k2] and [v, v2]
        return dq, dk[:, :n], dv[:, :n], None, None, dk[:, n:], dv[:, n:]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tl: TileList, scale: float,
                    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the tiles of ``tl``; the caller has checked :func:`native_reason`.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``: float32, bfloat16 or float16,
            any strides (a non-contiguous feature dim is copied).
        tl: the tile list (:func:`tile_list`) over all ``Nk + N2`` keys; scale: the score scale.
        extra_kv: ``(k2 (B, N2, Hkv, D), v2 (B, N2, Hkv, Dv))`` appended after k, v: the kernel attends over
            ``[k, k2]`` and ``[v, v2]`` without the caller concatenating them (it writes the one heads-first
            copy it makes anyway); gradients flow to both sources.

    Returns:
        ``out (B, Nq, Hq, Dv)`` in the input dtype and ``lse (B, Nq, Hq)`` float32 (``-inf`` and a zero
        output on rows that allow no key; their gradients are zero).
    """
    q, k, v = (_feature_contiguous(t) for t in (q, k, v))
    if extra_kv is None:
        return _FlashTiles.apply(q, k, v, tl, scale)
    k2, v2 = (_feature_contiguous(t) for t in extra_kv)
    return _FlashTiles.apply(q, k, v, tl, scale, k2, v2)


def release_workspace() -> None:
    """Free the kernel's pooled float32 scratch (packed K / V, float copies, dK / dV accumulators).

    The kernel keeps up to four scratch buffers between calls, sized by the largest call so far (for
    ``B=1, N=16384, H=8, D=64``: ~34 MiB each): touching freshly mapped memory on every call cost more
    than the attention itself in some measured cases. Call this to hand that memory back.
    """
    if _native.status() == "loaded":
        _native.ops().flash_tiles_release()
